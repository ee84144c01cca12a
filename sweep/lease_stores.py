"""Where a driver lease lives (`sweep.lease`): a file created with O_EXCL on local or network storage, an
S3 object created with a conditional put, or a study in an Optuna database. Each store offers create
(exclusive), read, replace (only if unchanged since read) and delete.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

LEASE_FILE = "driver.lease"
DEFAULT_TTL_S = 60.0
STUDY_LEASE_PREFIX = "thermosweep-lease:"


class Backend:
    """Where one lease lives. `version` is whatever tells one written record from the next."""

    where: str

    def create(self, record: dict[str, Any]) -> Any | None:
        """Create the lease if there is none; its version, or None if one exists."""
        raise NotImplementedError

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        """(record, version); record None for an unreadable lease (version None: there is none)."""
        raise NotImplementedError

    def replace(self, record: dict[str, Any], version: Any) -> Any | None:
        """Overwrite the lease if it is still at `version`; the new version, or None if it moved on."""
        raise NotImplementedError

    def delete(self, version: Any) -> None:
        """Remove the lease if it is still at `version`."""
        raise NotImplementedError


class LocalBackend(Backend):
    """`<run dir>/driver.lease` on a local or network filesystem."""

    def __init__(self, run_dir: str) -> None:
        self.dir = run_dir
        self.path = os.path.join(run_dir, LEASE_FILE)
        self.where = self.path

    def create(self, record: dict[str, Any]) -> Any | None:
        os.makedirs(self.dir, exist_ok=True)
        data = json.dumps(record).encode()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        return data

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(data), data
        except ValueError:  # cut off (a full disk, a crash while writing): dated by its mtime
            return {"renewed": mtime, "ttl_s": DEFAULT_TTL_S, "unreadable": True}, data

    def replace(self, record: dict[str, Any], version: Any) -> Any | None:
        _, current = self.read()
        if current != version:
            return None
        data = json.dumps(record).encode()
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except OSError:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return data

    def delete(self, version: Any) -> None:
        _, current = self.read()
        if current is not None and current == version:
            os.unlink(self.path)


class S3Backend(Backend):
    """The object `<run prefix>/driver.lease` in an S3 bucket (any store that honours conditional puts)."""

    def __init__(self, run_uri: str) -> None:
        import boto3

        bucket_and_key = run_uri.split("://", 1)[1]
        self.bucket, _, prefix = bucket_and_key.partition("/")
        self.key = f"{prefix.rstrip('/')}/{LEASE_FILE}".lstrip("/")
        self.where = f"s3://{self.bucket}/{self.key}"
        self.client = boto3.client("s3")  # AWS_ENDPOINT_URL, keys and region from the environment

    def _refused(self, err: Exception) -> bool:
        code = getattr(err, "response", {}).get("Error", {}).get("Code")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def create(self, record: dict[str, Any]) -> Any | None:
        from botocore.exceptions import ClientError

        try:
            out = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(), IfNoneMatch="*"
            )
        except ClientError as err:
            if self._refused(err):
                return None
            raise
        return out["ETag"]

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        from botocore.exceptions import ClientError

        try:
            out = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        data = out["Body"].read()
        try:
            return json.loads(data), out["ETag"]
        except ValueError:
            stamp = out["LastModified"].timestamp()
            return {"renewed": stamp, "ttl_s": DEFAULT_TTL_S, "unreadable": True}, out["ETag"]

    def replace(self, record: dict[str, Any], version: Any) -> Any | None:
        from botocore.exceptions import ClientError

        try:
            out = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(), IfMatch=version
            )
        except ClientError as err:
            if self._refused(err):
                return None
            raise
        return out["ETag"]

    def delete(self, version: Any) -> None:
        _, current = self.read()
        if current == version:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class StudyBackend(Backend):
    """A lease study `thermosweep-lease:<study>` in an Optuna storage: creating it is exclusive (study
    names are unique in the database); the record lives in its user attributes."""

    def __init__(self, storage: Any, study_name: str, where: str) -> None:
        self.storage = storage
        self.name = f"{STUDY_LEASE_PREFIX}{study_name}"
        self.where = f"study {self.name!r} in {where}"

    def _id(self) -> int | None:
        try:
            return self.storage.get_study_id_from_name(self.name)
        except KeyError:
            return None

    def create(self, record: dict[str, Any]) -> Any | None:
        from optuna.exceptions import DuplicatedStudyError
        from optuna.study import StudyDirection

        try:
            study_id = self.storage.create_new_study([StudyDirection.MINIMIZE], self.name)
        except DuplicatedStudyError:
            return None
        self.storage.set_study_user_attr(study_id, "lease", record)
        return record["token"]

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        study_id = self._id()
        if study_id is None:
            return None, None
        record = self.storage.get_study_user_attrs(study_id).get("lease")
        if record is None:  # created, its record not yet written: a driver between two calls
            return {"renewed": time.time(), "ttl_s": DEFAULT_TTL_S, "unreadable": True}, None
        return record, record.get("token")

    def replace(self, record: dict[str, Any], version: Any) -> Any | None:
        study_id = self._id()
        if study_id is None:
            return None
        current = self.storage.get_study_user_attrs(study_id).get("lease") or {}
        if current.get("token") != version:
            return None
        if record["token"] != version:  # a take-over: a fresh study, created exclusively again
            self.storage.delete_study(study_id)
            return self.create(record)
        self.storage.set_study_user_attr(study_id, "lease", record)
        return record["token"]

    def delete(self, version: Any) -> None:
        study_id = self._id()
        if study_id is None:
            return
        current = self.storage.get_study_user_attrs(study_id).get("lease") or {}
        if current.get("token") == version:
            self.storage.delete_study(study_id)


class NoLease(Backend):
    """Storage without a lease store (neither local nor s3://, e.g. gs://): every launch may take it."""

    def __init__(self, run_uri: str) -> None:
        self.where = f"{run_uri} (no lease: only local and s3:// storage hold one)"

    def create(self, record: dict[str, Any]) -> Any | None:
        return "none"

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        return None, None

    def replace(self, record: dict[str, Any], version: Any) -> Any | None:
        return version

    def delete(self, version: Any) -> None:
        pass


def run_backend(run_uri: str) -> Backend:
    """The lease of the run directory `run_uri`: a file (local path), an object (s3://), or none."""
    if run_uri.startswith("s3://"):
        return S3Backend(run_uri)
    if "://" in run_uri:
        return NoLease(run_uri)
    return LocalBackend(run_uri)
