"""Runs in an object store (s3://bucket/prefix/run, any S3-compatible store through AWS_ENDPOINT_URL) read
like local directories: `RemotePath` offers the few `pathlib.Path` operations `analysis.load` uses, on a
pyarrow filesystem. Nothing here imports JAX, Ray or the model."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


class RemotePath:
    """A path in a pyarrow filesystem named by a URI (`s3://bucket/key`); `str()` gives the URI back."""

    def __init__(self, uri: str, fs: pafs.FileSystem | None = None, path: str | None = None) -> None:
        if fs is None or path is None:
            fs, path = pafs.FileSystem.from_uri(uri)
        self.scheme = uri.split("://", 1)[0]
        self.fs, self.path = fs, path.rstrip("/")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: RemotePath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(str(self), self.fs, f"{self.path}/{name}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(str(self), self.fs, self.path.rsplit("/", 1)[0])

    def resolve(self) -> RemotePath:
        return self

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def iterdir(self) -> list[RemotePath]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [RemotePath(str(self), self.fs, i.path) for i in infos]

    def glob(self, pattern: str) -> list[RemotePath]:
        """Matches of a pattern of '/'-separated parts, each an fnmatch pattern (no '**')."""
        found = [self]
        for part in pattern.split("/"):
            found = [c for p in found if p.is_dir() for c in p.iterdir() if fnmatch.fnmatch(c.name, part)]
        return found

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.readall()


def as_path(p: str | Path) -> Path | RemotePath:
    """A local `Path`, or a `RemotePath` for a string naming a URI (`s3://...`)."""
    return RemotePath(p) if isinstance(p, str) and "://" in p else Path(p)


def read_parquet(p: Path | RemotePath) -> Any:
    """A Parquet file as a DataFrame, local or remote; a remote one as one version of the file even while
    its driver rewrites it (`model.schema.read_table`)."""
    import pandas as pd

    if isinstance(p, RemotePath):
        from model.schema import read_table

        return read_table(p.fs, p.path).to_pandas()
    return pd.read_parquet(p)


def read_bytes(p: str | Path | RemotePath) -> bytes:
    """A file's bytes, local or remote (e.g. a sample grid in `Results.samples`, a path or URI)."""
    return (p if isinstance(p, RemotePath) else as_path(p)).read_bytes()
