"""Where a run's files live: a local directory, an NFS path or an object store (s3://...).

Every read and write of the sweep goes through these helpers, so one code path serves all three.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any

import pyarrow.fs as pafs


def storage_join(*parts: str) -> str:
    """Join a storage root (local path or URI) with path parts; a local root becomes absolute."""
    head = parts[0].rstrip("/")
    if "://" not in head:
        head = os.path.abspath(head)
    return "/".join([head, *(p.strip("/") for p in parts[1:])])


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a local path or a URI such as s3://bucket/prefix."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def read_json_uri(uri: str) -> Any:
    """The JSON document at a local path or URI, or None if there is none."""
    return read_json_at(*filesystem_for(uri))


def read_json_at(fs: pafs.FileSystem, path: str) -> Any:
    """The JSON document at `path` on filesystem `fs`, or None if there is none."""
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.readall().decode())
    except (FileNotFoundError, OSError):
        return None


def write_bytes_uri(uri: str, data: bytes) -> None:
    """Write `data` to a local path or URI, creating its directory. Atomic: readers see the old file or
    the whole new one, never part of it (locally a temporary name, then a rename; on an object store a
    single PUT), so a full disk or a crash cannot leave a file cut off."""
    fs, path = filesystem_for(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    atomic_write(path, data)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to the local file `path` under a temporary name in its directory, then rename it
    into place (removing the temporary file if the write fails, e.g. on a full disk)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_uri(uri: str, value: Any) -> None:
    """Write `value` as JSON to a local path or URI, creating its directory."""
    write_bytes_uri(uri, json.dumps(value, indent=1).encode())


def subdirectories(uri: str, prefix: str = "") -> list[str]:
    """Names of the directories directly under `uri` whose names start with `prefix`, sorted; [] if
    `uri` does not exist."""
    fs, path = filesystem_for(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    return sorted(
        i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)
    )
