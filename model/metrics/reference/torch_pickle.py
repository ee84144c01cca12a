"""Read a PyTorch state dict (`torch.save` output) into numpy arrays without torch and without running code.

Both on-disk formats are understood: the zip archive of torch >= 1.6 (`<name>/data.pkl` + `<name>/data/<key>`)
and the legacy stream (magic number, protocol, sys info, the pickle, the storage keys, then raw storages).
The unpickler resolves only the few globals a state dict needs (tensor rebuild functions, storage types,
OrderedDict); any other global, e.g. `os.system`, raises `UnpicklingError` before anything runs.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: Any


@dataclass
class _Storage:
    dtype: Any
    numel: int
    data: np.ndarray | None = None


@dataclass
class _LazyTensor:
    """A tensor whose storage bytes may arrive after the pickle (legacy format)."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    extra: tuple = field(default=())

    def materialise(self) -> np.ndarray:
        if self.storage.data is None:
            raise pickle.UnpicklingError("a tensor's storage was never read; the file is truncated")
        flat = self.storage.data
        if not self.size:
            return np.array(flat[self.offset])
        need = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride, strict=True)) + 1
        if min(self.size) > 0 and need > len(flat):
            raise pickle.UnpicklingError(f"tensor of size {self.size} runs past its storage ({len(flat)})")
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *extra):
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride), tuple(extra))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *extra):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(
            f"refusing global {module}.{name}: only tensor state dicts can be read from weight files"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self._load_storage(pid[1:])


def _finish(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _finish(v)) for k, v in obj.items())
    return obj


def _read_zip(zf: zipfile.ZipFile) -> dict[str, np.ndarray]:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise pickle.UnpicklingError(f"expected one data.pkl in the archive; found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    order = "<"
    if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() == b"big":
        order = ">"
    storages: dict[str, _Storage] = {}

    def load_storage(data):
        storage_type, key, _location, numel = data[:4]
        if key not in storages:
            dtype = np.dtype(storage_type.dtype).newbyteorder(order)
            raw = zf.read(f"{prefix}data/{key}")
            arr = np.frombuffer(raw, dtype=dtype).astype(np.dtype(storage_type.dtype))
            storages[key] = _Storage(storage_type.dtype, int(numel), arr)
        return storages[key]

    with zf.open(pkl[0]) as f:
        obj = _RestrictedUnpickler(io.BytesIO(f.read()), load_storage).load()
    return _finish(obj)


def _read_legacy(f: BinaryIO) -> dict[str, np.ndarray]:
    def no_storage(_):
        raise pickle.UnpicklingError("unexpected storage in a legacy header")

    def plain_load():
        return _RestrictedUnpickler(f, no_storage).load()

    if plain_load() != LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a PyTorch file (neither zip archive nor legacy magic number)")
    plain_load()  # protocol version
    sys_info = plain_load()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}
    views: list[tuple[_Storage, str, int, int]] = []

    def load_storage(data):
        storage_type, key, _location, numel, view = data[:5]
        if key not in storages:
            storages[key] = _Storage(storage_type.dtype, int(numel))
        if view is not None:  # a view into another storage: resolved once the root's bytes are read
            view_key, offset, view_size = view
            out = _Storage(storage_type.dtype, int(view_size))
            views.append((out, key, int(offset), int(view_size)))
            return out
        return storages[key]

    obj = _RestrictedUnpickler(f, load_storage).load()
    keys = plain_load()
    order = "<" if little else ">"
    for key in keys:
        storage = storages[key]
        (numel,) = struct.unpack(order + "q", f.read(8))
        dtype = np.dtype(storage.dtype).newbyteorder(order)
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} is truncated")
        storage.data = np.frombuffer(raw, dtype=dtype).astype(np.dtype(storage.dtype))
    for out, key, offset, size in views:
        out.data = storages[key].data[offset : offset + size]
    return _finish(obj)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict as {name: numpy array}, read without executing code."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            state = _read_zip(zf)
    else:
        with open(path, "rb") as f:
            state = _read_legacy(f)
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"{path} holds a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise pickle.UnpicklingError(f"{path}: entries {bad[:5]} are not tensors")
    return dict(state)
