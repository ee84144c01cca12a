"""A real S3 HTTP API on 127.0.0.1 for the tests: moto's server in this process's thread, reached only
through the standard AWS environment (AWS_ENDPOINT_URL, keys, region), as a user's S3-compatible store is.

Nothing inside the code under test is patched: pyarrow, pandas, boto3 and every Ray process the test
starts (they inherit the environment) talk HTTP to the server.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # created empty for the test

    def uri(self, *parts: str) -> str:
        """s3://BUCKET/part/part..."""
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        """A boto3 S3 client on the server (keys and region from the environment the fixture set)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """Start moto's S3 server on a free 127.0.0.1 port, set the standard AWS environment to it, create a
    bucket; stop the server (only this one) at the end."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3 = S3Server(endpoint, f"bkt-{uuid.uuid4().hex[:8]}")
    s3.client().create_bucket(Bucket=s3.bucket)
    try:
        yield s3
    finally:
        server.stop()
