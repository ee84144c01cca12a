"""Trials on GPUs, as far as a machine without one can check: the environment a GPU trial gets
(no preallocation, no CPU-only platform pin), the devices it takes, and Ray packing two
`--gpus-per-trial 0.5` trials onto one GPU at the same time."""

from __future__ import annotations

import os
import time

import pytest

from model.nets import resolve_conv_impl
from sweep import launch, trainable
from sweep.grid import build_parser


def _args(*flags: str):
    return build_parser().parse_args(list(flags))


def test_a_half_gpu_trial_gets_a_shared_gpu_environment():
    args = _args("--gpus-per-trial", "0.5", "--cpus-per-trial", "2")
    assert launch.devices_per_trial(args) == 1
    assert launch.resources_of(args) == {"CPU": 2.0, "GPU": 0.5}
    env = launch.trial_env(
        gpus_per_trial=0.5,
        cpus_per_trial=2,
        cpu_devices=1,
        base_xla_flags="--xla_force_host_platform_device_count=2 --x=1",
    )
    # two processes share the GPU: neither may grab 75% of its memory at start-up
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "JAX_PLATFORMS" not in env, "a GPU trial must not be pinned to the CPU"
    assert "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", "")
    assert env["XLA_FLAGS"] == "--x=1" and env["OMP_NUM_THREADS"] == "2"
    cpu = launch.trial_env(gpus_per_trial=0, cpus_per_trial=2, cpu_devices=2)
    assert cpu["JAX_PLATFORMS"] == "cpu" and "device_count=2" in cpu["XLA_FLAGS"]


def test_a_cpu_trial_gets_its_devices_whatever_flags_the_driver_had():
    """XLA stops reading XLA_FLAGS at the first word without `--`: every word the trial gets is a flag,
    each once, so the device count set last is read (a driver whose XLA_FLAGS already holds the
    single-thread flags, as after `sweep.reevaluate` in one process, once got trials of one device)."""
    import subprocess
    import sys

    single = launch.trial_env(gpus_per_trial=0, cpus_per_trial=1, cpu_devices=1)["XLA_FLAGS"]
    env = launch.trial_env(
        gpus_per_trial=0,
        cpus_per_trial=2,
        cpu_devices=2,
        base_xla_flags=f"--xla_force_host_platform_device_count=2 {single}",
    )
    words = env["XLA_FLAGS"].split()
    assert all(w.startswith("--") for w in words) and len(words) == len(set(words))
    child = {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.device_count())"],
        env=child,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "2"


def test_trial_devices_take_the_assigned_gpus(monkeypatch):
    fake = [f"gpu{i}" for i in range(2)]
    monkeypatch.setattr("jax.local_devices", lambda backend=None: fake if backend == "gpu" else ["cpu0"])
    assert trainable.trial_devices(0.5) == ["gpu0"]
    assert trainable.trial_devices(1) == ["gpu0"]
    assert trainable.trial_devices(2) == fake
    assert trainable.trial_devices(0) == ["cpu0"]


def test_auto_conv_impl_is_resolved_per_backend():
    """What docs/gpu.md and docs/training.md promise: `phases` on a CPU, `lax` on a GPU."""
    assert resolve_conv_impl("auto", "cpu") == "phases"
    assert resolve_conv_impl("auto", "gpu") == "lax"
    assert resolve_conv_impl("phases", "gpu") == "phases"
    assert resolve_conv_impl("lax", "cpu") == "lax"


@pytest.mark.slow
def test_ray_packs_two_half_gpu_trials_on_one_gpu_at_once(monkeypatch):
    """A local Ray instance told it has one GPU (none is needed to schedule): two tasks asking for 0.5 GPU
    each run concurrently on GPU 0 with the launch's trial environment; a third waits."""
    args = _args("--gpus-per-trial", "0.5")
    launch.set_ray_defaults(args, "runs")  # as a launch does, before Ray is imported (auth off locally)
    # the workers inherit the driver's environment: this test process pins JAX to the CPU (conftest), a
    # GPU cluster's driver does not
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    import ray

    env = launch.ray_trial_env(args, launch.devices_per_trial(args))
    ray.init(
        num_cpus=3, num_gpus=1, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False
    )
    try:

        @ray.remote(num_gpus=0.5, num_cpus=1)
        def trial(hold: float):
            start = time.time()
            time.sleep(hold)
            return (
                start,
                time.time(),
                ray.get_gpu_ids(),
                os.environ.get("CUDA_VISIBLE_DEVICES"),
                os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
                os.environ.get("JAX_PLATFORMS"),
            )

        results = ray.get([trial.remote(3.0) for _ in range(3)])
    finally:
        ray.shutdown()
    for _, _, gpu_ids, visible, prealloc, platforms in results:
        assert [str(g) for g in gpu_ids] == ["0"] and visible == "0"
        assert prealloc == "false" and platforms is None
    spans = sorted((s, e) for s, e, *_ in results)
    overlapping = sum(
        1
        for i in range(3)
        for j in range(i + 1, 3)
        if spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1]
    )
    assert overlapping == 1, spans  # two share the GPU; the third starts when one of them ends
