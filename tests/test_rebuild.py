"""A grid whose Ray Tune state is cut off is rebuilt from thermosweep's own files: which trials still run,
and from which checkpoint (no Ray needed to check the choice)."""

from __future__ import annotations

import json
from pathlib import Path

from model.config import get_preset
from sweep import rebuild
from sweep.results import ResultsTables
from sweep.trainable import trial_spec


def _checkpoint(trial_dir: Path, number: int, epoch: int, history_text: str | None = None) -> None:
    d = trial_dir / f"checkpoint_{number:06d}"
    d.mkdir(parents=True)
    (d / "trial.json").write_text(json.dumps({"epoch": epoch}))
    history = [{"epoch": e + 1, "train_loss": float(e)} for e in range(epoch)]
    (d / "history.json").write_text(history_text if history_text is not None else json.dumps(history))


def test_unreadable_tune_state_is_recognised(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert rebuild.unreadable_tune_state(str(run)) is None  # nothing written yet: a fresh start
    (run / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [')
    (run / "tuner.pkl").write_bytes(b"x")
    assert "experiment_state-2026-01-01_00-00-00.json cannot be read" in rebuild.unreadable_tune_state(
        str(run)
    )
    (run / "experiment_state-2026-01-02_00-00-00.json").write_text('{"trial_data": []}')  # a newer one
    assert rebuild.unreadable_tune_state(str(run)) is None


def test_newest_checkpoint_is_chosen_by_epoch_and_must_be_whole(tmp_path):
    trial = tmp_path / "t"
    _checkpoint(trial, 3, 4)  # left by the run before a rebuild
    _checkpoint(trial, 0, 6)  # the rebuilt run numbers from 0 again
    _checkpoint(trial, 1, 7, history_text="")  # cut off by a full disk
    assert rebuild.newest_checkpoint_uri(str(trial)).endswith("checkpoint_000000")
    assert [r["epoch"] for r in rebuild.own_history(str(trial))] == [1, 2, 3, 4, 5, 6]
    assert rebuild.newest_checkpoint_uri(str(tmp_path / "none")) is None


def test_pending_specs_from_manifest_parquet_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    config = get_preset("digits", epochs=3)
    specs = [trial_spec(config, trial_id=t, cell="c", repetition=i) for i, t in enumerate("abcde")]
    tables = ResultsTables(str(run / "results"))
    for t, status, error in [
        ("a", "TERMINATED", None),
        ("b", "RUNNING", None),
        ("c", "RUNNING", None),
        ("d", "ERROR", "DivergenceError: loss is nan"),
        ("e", "ERROR", "OSError: [Errno 28] No space left on device"),
    ]:
        tables.upsert_trial(t, run="run", cell="c", status=status, error=error)
    tables.flush()
    _checkpoint(run / "b", 2, 3)  # finished, but the killed driver never wrote it
    _checkpoint(run / "c", 0, 1)  # one epoch of three

    pending = rebuild.pending_specs(str(run), specs, tables, retry_errored=False)
    assert [s["trial_id"] for s in pending] == ["c", "e"]  # a full storage's ERROR runs again
    assert pending[0][rebuild.CHECKPOINTS_KEY] == f"{run}/c"
    again = ResultsTables(str(run / "results"))
    assert again.trials["b"]["status"] == "TERMINATED" and again.trials["b"]["epochs_completed"] == 3
    assert sorted(e for t, e in again.epochs if t == "c") == [1]
    retried = rebuild.pending_specs(str(run), specs, again, retry_errored=True)
    assert [s["trial_id"] for s in retried] == ["c", "d", "e"]
