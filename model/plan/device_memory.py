"""Whether a train step fits its device: refused before compiling when it surely cannot, and the same
advice when XLA runs out of memory anyway.

`check_step_fits` compares `model.plan.memory.estimate_step_memory` (from shapes alone, no compile) with the
device's memory: a GPU's allocator limit, or on the CPU the machine's physical memory. The estimate
follows XLA within 30% on the CPU backend, so a step is refused only when even 70% of its estimate
exceeds the memory; a borderline step is tried, and if XLA then fails with RESOURCE_EXHAUSTED,
`out_of_memory_as_advice` turns that traceback into the same one-line `DeviceMemoryError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from model.config import ExperimentConfig

ESTIMATE_TOLERANCE = 0.3  # model.plan.memory's estimate is within 30% of XLA's own figure


class DeviceMemoryError(ValueError):
    """The step of this config needs more memory than the device has; the message names what to lower.

    A ValueError: like an invalid config, retrying on the same device cannot help."""


def device_memory(device: Any) -> int | None:
    """Bytes the device can hold: the accelerator's allocator limit, or the host's physical memory for a
    CPU device; None when neither is known."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    return None


def memory_advice(config: ExperimentConfig) -> str:
    """The fields whose values set the step's memory, with their values, and the other ways out."""
    fields = ["batch_size"] + (["num_temps"] if config.is_thermo else []) + ["image_size", "gen_width"]
    values = ", ".join(f"{name}={getattr(config, name)}" for name in fields)
    advice = f"lower {values}"
    if config.conv_impl != "lax":
        advice += " or use --set conv_impl=lax (the phase matmuls keep ~20x more)"
    return advice + "; or train on more devices per trial (the batch is split over them)"


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_step_fits(config: ExperimentConfig, devices: Sequence[Any]) -> None:
    """Refuse, before anything is compiled, a train step whose estimated peak memory per device cannot
    fit `devices` (the devices it would be split over). Raises DeviceMemoryError; passes when the
    device's memory is unknown."""
    from model.plan.memory import estimate_step_memory

    device = devices[0]
    limit = device_memory(device)
    if limit is None:
        return
    need = estimate_step_memory(config, n_devices=len(devices), backend=device.platform)
    if need * (1 - ESTIMATE_TOLERANCE) > limit:
        raise DeviceMemoryError(
            f"the train step needs about {_gib(need)} per device (estimated from the shapes) but a "
            f"{device.platform} device here has {_gib(limit)}: {memory_advice(config)}"
        )


def is_out_of_memory(err: BaseException) -> bool:
    """True for XLA's out-of-memory error (RESOURCE_EXHAUSTED), at compile or run time."""
    import jax

    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


@contextlib.contextmanager
def out_of_memory_as_advice(config: ExperimentConfig) -> Iterator[None]:
    """Re-raise XLA's out-of-memory error inside the block as a one-line DeviceMemoryError."""
    try:
        yield
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        first = " ".join(str(err).split())[:160]
        raise DeviceMemoryError(f"XLA ran out of device memory ({first}): {memory_advice(config)}") from None
