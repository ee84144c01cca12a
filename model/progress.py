"""Where a running epoch stands, at most every few seconds: step of steps, images/s, elapsed time, the ETA
of the epoch and of the run.

`ProgressMeter` is what `model.train` and every sweep trial hand to `train_epoch` as its `on_step` hook.
Steps are dispatched asynchronously, so the time at which a step is dispatched says little about how fast
the devices go: when (and only when) a report is due, the meter waits for the devices to finish what was
dispatched, so images/s is measured, not guessed. It never touches the numbers being trained.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from model.loop import StepProgress


@dataclasses.dataclass(frozen=True)
class Progress:
    """One report: where the epoch stands and how long the epoch and the run still need (seconds)."""

    epoch: int  # 1-based epoch being trained
    epochs: int  # epochs of the whole run (trial)
    step: int  # steps of this epoch done
    steps: int  # steps in the epoch
    images_per_s: float  # training images per second over this epoch so far
    elapsed_s: float  # seconds since the epoch began
    epoch_eta_s: float  # seconds left in this epoch's training steps
    trial_eta_s: float  # seconds left in the run: this epoch, then the epochs after it
    epoch_s: float  # seconds an epoch takes: the finished epochs' mean, else this epoch's pace

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def wait_for_devices() -> None:
    """Block until every computation dispatched so far has finished (the train step's outputs among them).

    `train_epoch` hands its hook no arrays, so this waits on every live array, which holds the newest
    step's carry; it is called only when a report is due (every `--progress-every-s` seconds), so its cost
    is a pause of the dispatch queue at that moment and nothing else."""
    import jax

    for array in jax.live_arrays():
        try:
            array.block_until_ready()
        except RuntimeError:  # deleted (donated) while listed
            pass


def progress_of(p: StepProgress, epochs: int, epoch_seconds: list[float], elapsed_s: float) -> Progress:
    """The report for step `p` after `elapsed_s` seconds of epoch `p.epoch`: the epoch's ETA from its own
    rate so far; each later epoch taken as long as the mean of the finished ones (this run's), or as this
    epoch's pace when none has finished."""
    per_step = elapsed_s / max(p.step, 1)
    epoch_eta = per_step * (p.steps - p.step)
    later = epochs - p.epoch
    per_epoch = sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else per_step * p.steps
    return Progress(
        epoch=p.epoch,
        epochs=epochs,
        step=p.step,
        steps=p.steps,
        images_per_s=p.step * p.batch_size / elapsed_s if elapsed_s > 0 else 0.0,
        elapsed_s=elapsed_s,
        epoch_eta_s=epoch_eta,
        trial_eta_s=epoch_eta + max(later, 0) * per_epoch,
        epoch_s=per_epoch,
    )


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: a duration for humans."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_progress(p: Progress) -> str:
    """One plain line, e.g. `epoch 3/6 step 120/160 (75%)  412 img/s  elapsed 1m02s  ETA epoch 21s, run
    5m10s`."""
    return (
        f"epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps} ({100 * p.step / max(p.steps, 1):.0f}%)  "
        f"{p.images_per_s:.4g} img/s  elapsed {duration(p.elapsed_s)}  "
        f"ETA epoch {duration(p.epoch_eta_s)}, run {duration(p.trial_eta_s)}"
    )


class ProgressMeter:
    """The `on_step` hook of `train_epoch`: calls `emit(Progress)` at most every `every_s` seconds (never
    when `every_s` <= 0), after waiting for the devices (`sync`). Tell it each finished epoch's seconds with
    `epoch_done` so the run's ETA uses them."""

    def __init__(
        self,
        every_s: float,
        epochs: int,
        emit: Callable[[Progress], None],
        *,
        epoch_seconds: list[float] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sync: Callable[[], None] = wait_for_devices,
    ) -> None:
        self.every_s = every_s
        self.epochs = epochs
        self.emit = emit
        self.epoch_seconds = list(epoch_seconds or [])
        self.clock = clock
        self.sync = sync
        self._last: float | None = None

    def __call__(self, p: StepProgress) -> None:
        if self.every_s <= 0:
            return
        now = self.clock()
        if self._last is None:  # the first step of the meter's life starts the clock (compilation)
            self._last = now
        if now - self._last < self.every_s:
            return
        self.sync()
        waited = self.clock() - now
        self._last = self.clock()
        self.emit(progress_of(p, self.epochs, self.epoch_seconds, p.elapsed_s + waited))

    def epoch_done(self, seconds: float) -> None:
        self.epoch_seconds.append(float(seconds))


class TerminalBar:
    """One updating tqdm line for a run in a terminal: the report (step, images/s, ETAs), then a bar of the
    run's steps so far of all its steps. `write` prints a line above the bar (the epoch lines)."""

    def __init__(self, epochs: int, stream: object = None) -> None:
        self.epochs = epochs
        self.stream = stream
        self._bar = None

    def __call__(self, p: Progress) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(
                total=self.epochs * p.steps,
                file=self.stream,
                bar_format="{desc}  {percentage:3.0f}%|{bar}|",
                dynamic_ncols=True,
            )
        self._bar.n = (p.epoch - 1) * p.steps + p.step
        self._bar.set_description_str(format_progress(p), refresh=True)

    def write(self, line: str) -> None:
        if self._bar is None:
            print(line, file=self.stream, flush=True)
        else:
            self._bar.write(line, file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
