"""Read a W&B run's own file (`run-<id>.wandb`, written offline) back: its run record, history rows and
summary, with W&B's protobuf messages. The file is a LevelDB-style log: a 7-byte header (":W&B", magic,
version), then 32 KiB blocks of records, each a 7-byte header (CRC32, length, type: full, first, middle,
last) and its bytes; wandb 0.31 no longer ships a Python reader for it."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every record (wandb_internal_pb2.Record) of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        if pos + 7 + length > len(data):  # cut off (a killed writer): the records before it stand
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> dict[str, Any]:
    """{"id", "name", "group", "tags", "config", "history" (rows by _step), "summary" (the final fold of
    its updates)} of one offline run file."""
    run: dict[str, Any] = {"history": {}, "summary": {}, "config": {}}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group, tags=list(r.run.tags))
            run["config"].update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            run["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in r.history.item}
            run["history"][row["_step"]] = row
        elif kind == "summary":
            run["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return run
