"""The Ray Tune trainable: one trial trains one `ExperimentConfig`, epoch by epoch, checkpointed with Orbax.

A trial's Tune config is `{"trial": trial_spec(...)}` (a grid) and may carry `ExperimentConfig` fields at
its top level as per-trial overrides (a search space, e.g. `{"trial": spec, "temp_power": loguniform}`).
`resolve_trial` turns it back into the config and the trial's identity; `make_trainable` builds the Ray
trainable (with its resources) that both `sweep.grid` and `sweep.search` run. The environment of the trial
processes is `sweep.launch.trial_env`.

Every epoch the trial saves its whole train state and its readings history into a temporary directory and
reports both through `tune.report`, which copies the directory into the run's storage. A restarted trial
(FailureConfig retry or `--resume`) restores the newest checkpoint and goes on from the next epoch; the
data order and chain noise derive from (seed, epoch) and the stored PRNG key, so on CPU it ends with the
numbers of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import tempfile
from collections.abc import Callable
from typing import Any

from model.config import ExperimentConfig, apply_overrides, config_fields

SPEC_KEY = "trial"
SAMPLE_GRID = 64  # images per sample grid (8 x 8)


def trial_spec(
    config: ExperimentConfig,
    *,
    trial_id: str | None,
    cell: str | None = None,
    repetition: int | None = None,
    grid: str | None = None,
    columns: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON-able description of one trial placed under `SPEC_KEY` in its Tune config.

    `columns` are extra trials-table columns (e.g. {"search": "p-eta"}); `trial_id=None` lets the trial
    use Ray's own trial id (searches, whose trials are created on the fly)."""
    return {
        "trial_id": trial_id,
        "cell": cell,
        "repetition": repetition,
        "grid": grid,
        "experiment": config.to_dict(),
        "columns": dict(columns or {}),
    }


def resolve_trial(tune_config: dict[str, Any]) -> tuple[ExperimentConfig, dict[str, Any]]:
    """(config, meta) of a trial from its Tune config: the spec's experiment with any top-level config
    fields applied on top. meta holds trial_id, cell, repetition, grid and columns."""
    spec = tune_config.get(SPEC_KEY, tune_config)
    config = ExperimentConfig(**spec["experiment"])
    overrides = {k: v for k, v in tune_config.items() if k in config_fields()}
    if overrides:
        config = apply_overrides(config, overrides)
    meta = {k: spec.get(k) for k in ("trial_id", "cell", "repetition", "grid")}
    meta["columns"] = dict(spec.get("columns") or {})
    return config, meta


def trial_devices(gpus_per_trial: float) -> list[Any]:
    """The JAX devices this trial trains on: the GPUs Ray assigned (CUDA_VISIBLE_DEVICES), or every CPU
    device of the process (several when XLA_FLAGS splits the host)."""
    import jax

    if gpus_per_trial > 0:
        gpus = jax.local_devices(backend="gpu")
        return gpus[: max(1, int(gpus_per_trial))]
    return jax.local_devices(backend="cpu")


def sample_path(samples_uri: str, trial_id: str, epoch: int) -> str:
    """`<storage>/<run>/samples/<trial_id>/epoch_XXXX.png` (the layout `analysis` reads)."""
    return f"{samples_uri.rstrip('/')}/{trial_id}/epoch_{epoch:04d}.png"


def save_image_grid(images: Any, uri: str) -> None:
    """Tile images (N, H, W, C) in [-1, 1] into a square PNG (small images upscaled) at a path or URI."""
    import io

    import numpy as np
    from PIL import Image

    from sweep.storage import write_bytes_uri

    x = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    n, h, w, c = x.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i]
    scale = max(1, 64 // max(h, w))
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_uri(uri, buffer.getvalue())


def _node_id() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (a direct call in a test) there is no node
        return None


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def run_trial(
    tune_config: dict[str, Any],
    *,
    samples_uri: str | None,
    gpus_per_trial: float = 0.0,
    checkpoint_every_s: float | None = None,
    run_uri: str | None = None,
    progress_every_s: float = 0.0,
) -> None:
    """Train one trial to its last epoch, reporting readings and an Orbax checkpoint every epoch, and with
    `checkpoint_every_s` also a mid-epoch checkpoint after that many seconds of training inside an epoch
    (reported as a result without readings: `sweep.partial`). Progress goes to the log and, every
    `progress_every_s` seconds, to `<run_uri>/progress/<trial_id>.json`.

    Resumes from `tune.get_checkpoint()` when Tune restarts the trial, falling back to an older checkpoint
    if that one cannot be read. An error that a retry cannot cure (`sweep.failures.is_fatal`: divergence,
    invalid config, no readable checkpoint) is reported, as one line with `FATAL_KEY`, before it is
    raised, so the driver ends the trial in ERROR without retrying it; a divergence is reported with a
    checkpoint that records it, so a later restart stops at once instead of training the epoch again.
    With `run_uri` and `progress_every_s` > 0, where the epoch stands is printed and written to
    `sweep.progress.progress_uri(run_uri, trial_id)` at most every `progress_every_s` seconds."""
    from ray import tune

    from sweep.failures import FATAL_KEY, is_fatal, one_line

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one epoch line, not one per checkpoint
    spec = tune_config.get(SPEC_KEY, tune_config)
    trial_id = (spec.get("trial_id") if isinstance(spec, dict) else None) or tune.get_context().get_trial_id()
    try:
        _train_trial(
            tune_config,
            trial_id,
            samples_uri=samples_uri,
            gpus_per_trial=gpus_per_trial,
            checkpoint_every_s=checkpoint_every_s,
            progress=_progress_meter(trial_id, run_uri, progress_every_s),
        )
    except Exception as err:
        if not is_fatal(err):
            raise
        if not getattr(err, "reported_to_tune", False):  # the driver prints it, once (TrialFailures)
            tune.report({"error": one_line(err), FATAL_KEY: True})
        raise


def _progress_meter(trial_id: str, run_uri: str | None, every_s: float) -> Any:
    """The trial's `on_step` hook: a plain progress line and the progress file the driver reads."""
    from model.progress import ProgressMeter, format_progress
    from sweep.progress import progress_uri, write_progress

    def emit(p: Any) -> None:
        print(f"[{trial_id}] {format_progress(p)}", flush=True)
        if run_uri is not None:
            write_progress(progress_uri(run_uri, trial_id), {"trial_id": trial_id, **p.to_dict()})

    return ProgressMeter(every_s, 0, emit)


def _train_trial(
    tune_config: dict[str, Any],
    trial_id: str,
    *,
    samples_uri: str | None,
    gpus_per_trial: float,
    checkpoint_every_s: float | None = None,
    progress: Any,
) -> None:
    from ray import tune

    from model import loop as mt
    from model import streams
    from model.data import load_dataset
    from model.nets import resolve_config
    from sweep.checkpoint import (
        CheckpointError,
        TrialCheckpointer,
        completed_epochs,
        mark_diverged,
        mark_unreadable,
        recorded_divergence,
        restore_newest_readable,
    )
    from sweep.failures import FATAL_KEY, one_line
    from sweep.partial import partial_result
    from sweep.rebuild import CHECKPOINTS_KEY, own_checkpoint

    config, meta = resolve_trial(tune_config)
    meta = {**meta, "trial_id": trial_id}
    checkpoint = tune.get_checkpoint()
    spec = tune_config.get(SPEC_KEY, tune_config)
    if checkpoint is None and isinstance(spec, dict) and spec.get(CHECKPOINTS_KEY):
        checkpoint = own_checkpoint(spec[CHECKPOINTS_KEY])  # a rebuilt run (sweep.rebuild)
    if checkpoint is not None and (diverged := recorded_divergence(checkpoint)):
        raise mt.DivergenceError(diverged.removeprefix("DivergenceError: "))  # no data or state needed
    devices = trial_devices(gpus_per_trial)
    config = resolve_config(config, devices[0].platform)  # once, for the devices this trial was given
    static = {
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "node": socket.gethostname(),
        "node_id": _node_id(),
        "conv_impl": config.conv_impl,
    }
    dataset = load_dataset(config)
    template = mt.init_state(config)
    state, history = template, []
    restored = False
    with TrialCheckpointer() as checkpointer:
        if checkpoint is not None:

            def log(line: str) -> None:
                print(f"[{trial_id}] {line}", flush=True)

            try:
                found = restore_newest_readable(checkpointer, checkpoint, template, log=log)
            except CheckpointError as err:  # recorded, so that Ray can later restore something that exists
                with tempfile.TemporaryDirectory() as directory:
                    mark_unreadable(directory, one_line(err), {**meta, "epoch": 0})
                    tune.report(
                        {**static, "error": one_line(err), FATAL_KEY: True},
                        checkpoint=tune.Checkpoint.from_directory(directory),
                    )
                err.reported_to_tune = True
                raise
            if found is None:
                log("its checkpoints are gone (deleted?): training again from epoch 0")
            else:
                state, history, _ = found
                restored = True
                if isinstance(state, mt.PartialEpoch):
                    log(f"resumed in epoch {completed_epochs(state) + 1} after step {state.done}")
                else:
                    log(f"resumed after epoch {int(state.epoch)}")

        def save_partial(partial: mt.PartialEpoch) -> None:
            """A mid-epoch checkpoint, reported to Tune as a result without readings."""
            epoch = completed_epochs(partial)
            with tempfile.TemporaryDirectory() as directory:
                checkpointer.save_partial(directory, partial, history, {**meta, "epoch": epoch})
                tune.report(
                    partial_result(epoch + 1, partial.done, static),
                    checkpoint=tune.Checkpoint.from_directory(directory),
                )

        progress.epochs = config.epochs
        progress.epoch_seconds = [float(r["epoch_time_s"]) for r in history if "epoch_time_s" in r]
        evaluator = None
        if completed_epochs(state) < config.epochs:
            evaluator = mt.make_evaluator_or_none(config, dataset, log=lambda s: print(f"[{trial_id}] {s}"))
        for _ in range(completed_epochs(state), config.epochs):
            try:
                state, readings = mt.run_epoch(
                    config,
                    state,
                    dataset,
                    devices=devices,
                    evaluator=evaluator,
                    on_partial=save_partial if checkpoint_every_s else None,
                    partial_every_s=checkpoint_every_s,
                    on_step=progress,
                )
            except mt.DivergenceError as err:
                message = f"DivergenceError: {err}"
                with tempfile.TemporaryDirectory() as directory:
                    mark_diverged(directory, message, {**meta, "epoch": len(history)}, history)
                    tune.report(
                        {**static, "epoch": len(history), "error": message, FATAL_KEY: True},
                        checkpoint=tune.Checkpoint.from_directory(directory),
                    )
                err.reported_to_tune = True
                raise
            readings = {k: _plain(v) for k, v in readings.items()}
            history.append(readings)
            progress.epoch_done(readings["epoch_time_s"])
            epoch = int(readings["epoch"])
            due = config.sample_every and (epoch % config.sample_every == 0 or epoch == config.epochs)
            if samples_uri and due:
                key = streams.fixed_key(config.seed, streams.SAMPLE_GRID)
                images = mt.generate_images(config, state, key, SAMPLE_GRID)
                save_image_grid(images, sample_path(samples_uri, trial_id, epoch))
            metrics = {
                **static,
                **{k: v for k, v in readings.items() if isinstance(v, int | float)},
                "readings_json": json.dumps(readings),
            }
            if restored:  # the epochs before the restart, in case the driver never wrote them
                metrics["restored_history_json"] = json.dumps(history[:-1])
                restored = False
            with tempfile.TemporaryDirectory() as directory:
                checkpointer.save(directory, state, history, {**meta, "epoch": epoch})
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
            print(f"[{trial_id}] {mt.format_readings(readings)}", flush=True)


def make_trainable(
    *,
    samples_uri: str | None,
    gpus_per_trial: float = 0.0,
    cpus_per_trial: float = 1.0,
    checkpoint_every_s: float | None = None,
    run_uri: str | None = None,
    progress_every_s: float = 0.0,
) -> Callable[[dict[str, Any]], None]:
    """The Ray trainable (a function trainable with its resources) for `Tuner(...)` / `Tuner.restore`.

    Each trial asks Ray for `cpus_per_trial` CPUs and `gpus_per_trial` GPUs and trains data-parallel on
    the devices it sees (set up by `trial_env`). Sample grids go under `samples_uri/<trial_id>/`, progress
    reports (every `progress_every_s` seconds, 0: none) to `<run_uri>/progress/<trial_id>.json`.
    `checkpoint_every_s` adds mid-epoch checkpoints (a launch setting, not part of any trial's config)."""
    from ray import tune

    def thermosweep_trial(tune_config: dict[str, Any]) -> None:
        run_trial(
            tune_config,
            samples_uri=samples_uri,
            gpus_per_trial=gpus_per_trial,
            checkpoint_every_s=checkpoint_every_s,
            run_uri=run_uri,
            progress_every_s=progress_every_s,
        )

    resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    return tune.with_resources(thermosweep_trial, resources)
