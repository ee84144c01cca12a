"""InceptionV3-FID in Flax: architecture against the published one, resize, weight files (model/metrics)."""

from __future__ import annotations

import collections
import pickle
import struct
import sys
import types
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from model.metrics import inception
from model.metrics.reference.torch_pickle import LEGACY_MAGIC, load_state_dict

# torchvision's Inception3 with pytorch-fid's FID blocks, up to pool3: 94 conv+BN layers. The count of
# torch `parameters()` (conv weights + BN weight/bias) is torchvision's documented 27,161,264 for
# inception_v3 minus its fc (2048*1000 + 1000) and AuxLogits (98,560 + 2,459,136 + 769,000).
TORCH_PARAMETER_COUNT = 27_161_264 - 2_049_000 - 3_326_696  # = 21,785,568


def _published_convs() -> dict[str, tuple[int, int, int, int]]:
    """{torch module path: (in, out, kh, kw)} for every BasicConv2d, from the published block definitions."""
    convs = {
        "Conv2d_1a_3x3": (3, 32, 3, 3),
        "Conv2d_2a_3x3": (32, 32, 3, 3),
        "Conv2d_2b_3x3": (32, 64, 3, 3),
        "Conv2d_3b_1x1": (64, 80, 1, 1),
        "Conv2d_4a_3x3": (80, 192, 3, 3),
    }

    def block_a(name, cin, pool):
        convs.update(
            {
                f"{name}.branch1x1": (cin, 64, 1, 1),
                f"{name}.branch5x5_1": (cin, 48, 1, 1),
                f"{name}.branch5x5_2": (48, 64, 5, 5),
                f"{name}.branch3x3dbl_1": (cin, 64, 1, 1),
                f"{name}.branch3x3dbl_2": (64, 96, 3, 3),
                f"{name}.branch3x3dbl_3": (96, 96, 3, 3),
                f"{name}.branch_pool": (cin, pool, 1, 1),
            }
        )
        return 64 + 64 + 96 + pool

    def block_c(name, c7):
        convs.update(
            {
                f"{name}.branch1x1": (768, 192, 1, 1),
                f"{name}.branch7x7_1": (768, c7, 1, 1),
                f"{name}.branch7x7_2": (c7, c7, 1, 7),
                f"{name}.branch7x7_3": (c7, 192, 7, 1),
                f"{name}.branch7x7dbl_1": (768, c7, 1, 1),
                f"{name}.branch7x7dbl_2": (c7, c7, 7, 1),
                f"{name}.branch7x7dbl_3": (c7, c7, 1, 7),
                f"{name}.branch7x7dbl_4": (c7, c7, 7, 1),
                f"{name}.branch7x7dbl_5": (c7, 192, 1, 7),
                f"{name}.branch_pool": (768, 192, 1, 1),
            }
        )

    def block_e(name, cin):
        convs.update(
            {
                f"{name}.branch1x1": (cin, 320, 1, 1),
                f"{name}.branch3x3_1": (cin, 384, 1, 1),
                f"{name}.branch3x3_2a": (384, 384, 1, 3),
                f"{name}.branch3x3_2b": (384, 384, 3, 1),
                f"{name}.branch3x3dbl_1": (cin, 448, 1, 1),
                f"{name}.branch3x3dbl_2": (448, 384, 3, 3),
                f"{name}.branch3x3dbl_3a": (384, 384, 1, 3),
                f"{name}.branch3x3dbl_3b": (384, 384, 3, 1),
                f"{name}.branch_pool": (cin, 192, 1, 1),
            }
        )

    c = block_a("Mixed_5b", 192, 32)
    c = block_a("Mixed_5c", c, 64)
    c = block_a("Mixed_5d", c, 64)
    assert c == 288
    convs.update(
        {
            "Mixed_6a.branch3x3": (288, 384, 3, 3),
            "Mixed_6a.branch3x3dbl_1": (288, 64, 1, 1),
            "Mixed_6a.branch3x3dbl_2": (64, 96, 3, 3),
            "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3),
        }
    )
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        block_c(name, c7)
    convs.update(
        {
            "Mixed_7a.branch3x3_1": (768, 192, 1, 1),
            "Mixed_7a.branch3x3_2": (192, 320, 3, 3),
            "Mixed_7a.branch7x7x3_1": (768, 192, 1, 1),
            "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
            "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1),
            "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3),
        }
    )
    block_e("Mixed_7b", 1280)
    block_e("Mixed_7c", 2048)
    return convs


def _published_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, (cin, cout, kh, kw) in _published_convs().items():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{leaf}"] = (cout,)
    return shapes


def test_every_variable_matches_the_published_architecture():
    flat = inception._flatten(inception.abstract_variables())
    expected = {}
    for name, (cin, cout, kh, kw) in _published_convs().items():
        scope = name.replace(".", "/")
        expected[f"params/{scope}/conv/kernel"] = (kh, kw, cin, cout)
        expected[f"params/{scope}/bn/scale"] = (cout,)
        expected[f"params/{scope}/bn/bias"] = (cout,)
        expected[f"batch_stats/{scope}/bn/mean"] = (cout,)
        expected[f"batch_stats/{scope}/bn/var"] = (cout,)
    assert len(_published_convs()) == 94
    assert {k: tuple(v.shape) for k, v in flat.items()} == expected
    n_params = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.startswith("params/"))
    assert n_params == TORCH_PARAMETER_COUNT == 21_785_568


def test_bilinear_resize_is_pytorchs_align_corners_false():
    # F.interpolate([1, 2, 3, 4], size=8, mode="linear", align_corners=False)
    m = inception.bilinear_matrix(4, 8)
    np.testing.assert_allclose(m @ np.array([1.0, 2, 3, 4]), [1.0, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75, 4.0])
    np.testing.assert_allclose(inception.bilinear_matrix(2, 4) @ np.array([0.0, 1.0]), [0, 0.25, 0.75, 1])
    # 3 -> 299: every row interpolates between neighbours and preserves constants
    big = inception.bilinear_matrix(32, 299)
    np.testing.assert_allclose(big.sum(1), 1.0, rtol=1e-6)
    assert ((big > 0).sum(1) <= 2).all()
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 16, 1)).astype(np.float32))
    out = inception.resize_for_inception(images)
    assert out.shape == (2, 299, 299, 3)
    expected = np.einsum("oh,nhw->now", big, np.asarray(images[..., 0]))
    expected = np.einsum("pw,now->nop", inception.bilinear_matrix(16, 299), expected)
    np.testing.assert_allclose(np.asarray(out[..., 2]), expected, atol=1e-5)


def _random_flat(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(v.shape, dtype=np.float32)
        for k, v in inception._flatten(inception.abstract_variables()).items()
    }


def test_npz_round_trip_and_errors(tmp_path):
    flat = _random_flat()
    path = tmp_path / "w.npz"
    inception.save_npz(path, flat)
    loaded = inception._flatten(inception.load_variables(path))
    assert set(loaded) == set(flat)
    for k in ("params/Mixed_7c/branch_pool/conv/kernel", "batch_stats/Conv2d_1a_3x3/bn/var"):
        np.testing.assert_array_equal(np.asarray(loaded[k]), flat[k])
    bad = dict(flat)
    bad["params/Mixed_5b/branch1x1/conv/kernel"] = np.zeros((1, 1, 192, 65), np.float32)
    inception.save_npz(tmp_path / "bad.npz", bad)
    with pytest.raises(ValueError, match=r"Mixed_5b/branch1x1/conv/kernel has shape \(1, 1, 192, 65\)"):
        inception.load_variables(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a converted Inception weight file"):
        inception.load_variables(tmp_path / "other.npz")


def test_missing_weights_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("THERMOSWEEP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        inception.load_variables()
    message = str(err.value)
    assert str(tmp_path / "cache" / "inception-v3-fid.npz") in message
    assert "python -m model.metrics.inception fetch" in message


# --- writing torch.save files without torch: fake `torch` globals, pickled the way torch pickles them ---


def _rebuild_tensor_v2(*args):  # pickled by reference as torch._utils._rebuild_tensor_v2
    raise AssertionError("never called: the reader resolves this name itself")


class FloatStorage:  # pickled by reference as torch.FloatStorage
    pass


class LongStorage:
    pass


class _Tensor:
    def __init__(self, storage_key, offset, size, stride):
        self.args = (storage_key, offset, size, stride)

    def __reduce__(self):
        key, offset, size, stride = self.args
        return _rebuild_tensor_v2, (_StorageRef(key), offset, size, stride, False, collections.OrderedDict())


class _StorageRef:
    def __init__(self, key):
        self.key = key


@pytest.fixture()
def fake_torch(monkeypatch):
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for obj, mod, name in (
        (_rebuild_tensor_v2, utils_mod, "_rebuild_tensor_v2"),
        (FloatStorage, torch_mod, "FloatStorage"),
        (LongStorage, torch_mod, "LongStorage"),
    ):
        obj.__module__, obj.__qualname__ = mod.__name__, name
        setattr(mod, name, obj)
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)


def _torch_save(path, tensors: dict[str, np.ndarray], legacy: bool):
    """Write {name: array} as torch.save(state_dict) would: one storage per array (plus shared/strided
    cases built by the caller through `_Tensor`)."""
    storages, state = {}, collections.OrderedDict()
    for i, (name, value) in enumerate(tensors.items()):
        if isinstance(value, _Tensor):
            state[name] = value
            continue
        key = str(i)
        storages[key] = np.ascontiguousarray(value)
        stride = tuple(s // value.itemsize for s in storages[key].strides)
        state[name] = _Tensor(key, 0, value.shape, stride)
    for value in tensors.values():
        if isinstance(value, _Tensor):
            storages.setdefault(value.args[0], None)

    def persistent_id(obj):
        if isinstance(obj, _StorageRef):
            arr = storages[obj.key]
            kind = LongStorage if arr.dtype == np.int64 else FloatStorage
            return ("storage", kind, obj.key, "cpu", arr.size) + ((None,) if legacy else ())
        return None

    import io

    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = persistent_id
    pickler.dump(state)
    if not legacy:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", buf.getvalue())
            zf.writestr("archive/byteorder", "little")
            for key, arr in storages.items():
                zf.writestr(f"archive/data/{key}", arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        return
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(buf.getvalue())
        pickle.dump(list(storages), f, protocol=2)
        for arr in storages.values():
            f.write(struct.pack("<q", arr.size))
            f.write(arr.astype("<" + arr.dtype.str[1:]).tobytes())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_state_dict_reader(tmp_path, fake_torch, legacy):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 6)).astype(np.float32)
    tensors = {
        "a.weight": rng.standard_normal((3, 2, 5, 5)).astype(np.float32),
        "a.num_batches_tracked": np.array(7, dtype=np.int64),
        "shared": base,
        # a transposed view of the same storage at an offset: storage "2" is `base`
        "view": _Tensor("2", 1, (3, 4), (1, 6)),
    }
    path = tmp_path / "w.pth"
    _torch_save(path, tensors, legacy)
    state = load_state_dict(str(path))
    assert list(state) == list(tensors)
    np.testing.assert_array_equal(state["a.weight"], tensors["a.weight"])
    assert state["a.num_batches_tracked"] == 7 and state["a.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(
        state["view"], base.ravel()[1:].__getitem__(np.arange(3)[:, None] + 6 * np.arange(4)[None, :])
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_reader_refuses_code(tmp_path, legacy):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    payload = pickle.dumps(collections.OrderedDict(x=Evil()), protocol=2)
    path = tmp_path / "evil.pth"
    if legacy:
        with open(path, "wb") as f:
            for header in (LEGACY_MAGIC, 1001, {"little_endian": True}):
                pickle.dump(header, f, protocol=2)
            f.write(payload)
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        load_state_dict(str(path))
    assert not marker.exists()


def test_pth_converts_to_the_loadable_npz(tmp_path, fake_torch):
    rng = np.random.default_rng(1)
    tensors = {
        name: rng.standard_normal(shape, dtype=np.float32)
        for name, shape in _published_state_dict_shapes().items()
    }
    tensors["fc.weight"] = np.zeros((1008, 2048), np.float32)  # pytorch-fid's file carries the classifier
    tensors["fc.bias"] = np.zeros((1008,), np.float32)
    pth = tmp_path / "pt_inception.pth"
    _torch_save(pth, tensors, legacy=False)
    with pytest.raises(ValueError, match="does not start with 6726825d"):
        inception.convert(pth, tmp_path / "x.npz")
    out = inception.convert(pth, tmp_path / "cache" / inception.NPZ_NAME, check_hash=False)
    variables = inception.load_variables(out)
    kernel = np.asarray(variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"])
    torch_w = tensors["Mixed_6b.branch7x7_2.conv.weight"]  # (O, I, kh, kw) = (128, 128, 1, 7)
    assert kernel.shape == (1, 7, 128, 128)
    assert kernel[0, 3, 5, 9] == torch_w[9, 5, 0, 3]
    np.testing.assert_array_equal(
        np.asarray(variables["batch_stats"]["Mixed_7c"]["branch1x1"]["bn"]["var"]),
        tensors["Mixed_7c.branch1x1.bn.running_var"],
    )
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["Conv2d_1a_3x3"]["bn"]["scale"]), tensors["Conv2d_1a_3x3.bn.weight"]
    )


def test_forward_gives_2048_pool3_features():
    variables = inception.random_variables(0)
    features = inception.make_feature_fn(variables)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32))
    out = np.asarray(features(jnp.repeat(images, 3, axis=-1)))
    assert out.shape == (2, 2048) and np.isfinite(out).all() and (out >= 0).all()  # mean of ReLUs
    assert np.abs(out[0] - out[1]).max() > 1e-6 * np.abs(out).max()
    np.testing.assert_allclose(np.asarray(features(images)), out, rtol=1e-5, atol=1e-6)  # greyscale -> RGB


def test_evaluator_for_cifar10_needs_the_weight_file(tmp_path):
    from model.config import get_preset
    from model.data import Dataset
    from model.metrics import make_evaluator

    config = get_preset("cifar10", eval_num_min=10, eval_num_max=20, eval_num_points=2)
    images = np.zeros((20, 32, 32, 3), np.float32)
    with pytest.raises(FileNotFoundError, match=r"inception-v3-fid\.npz.*model\.metrics\.inception fetch"):
        make_evaluator(config, Dataset("cifar10", images, images), cache_dir=tmp_path)


def test_saved_weights_get_the_mode_of_any_new_file(tmp_path) -> None:
    """The .npz is written through a temporary file (created 0600); the result must follow the umask like
    any new file, so a shared cache directory stays readable."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        inception.save_npz(tmp_path / "w.npz", {"a": np.zeros(2, np.float32)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.npz").stat().st_mode) == 0o644
