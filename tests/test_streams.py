"""The PRNG streams folded into a run's seed (model/streams.py) cannot meet over any run length the
config allows up to MAX_EPOCH, and keep the numbers every run has used."""

from __future__ import annotations

import jax
import numpy as np

from model import streams


def numbers(max_epoch: int) -> np.ndarray:
    """Every number folded into the root key by a run of `max_epoch` epochs."""
    epochs = np.arange(1, max_epoch + 1, dtype=np.int64)
    per_epoch = [offset + epochs for offset in streams.PER_EPOCH.values()]
    return np.concatenate([*per_epoch, np.array(list(streams.FIXED.values()), dtype=np.int64)])


def test_per_epoch_streams_and_fixed_ones_never_share_a_number() -> None:
    every = numbers(streams.MAX_EPOCH)
    assert len(np.unique(every)) == len(every)
    assert every.max() < 2**32  # fold_in takes a uint32: no number wraps onto another


def test_one_more_epoch_would_meet_another_stream() -> None:
    """MAX_EPOCH is the bound, not a guess: a run one epoch longer would reuse a number."""
    every = numbers(streams.MAX_EPOCH + 1)
    assert len(np.unique(every)) < len(every)


def test_the_keys_are_the_ones_runs_have_always_used() -> None:
    root = jax.random.key(7)
    for offset, old in ((streams.VALIDATION_LOSS, 1_000_000), (streams.EVALUATION, 2_000_000)):
        got = jax.random.key_data(streams.epoch_key(7, offset, 3))
        assert np.array_equal(got, jax.random.key_data(jax.random.fold_in(root, old + 3)))
    got = jax.random.key_data(streams.epoch_key(7, streams.READINGS, 3))
    assert np.array_equal(got, jax.random.key_data(jax.random.fold_in(root, 3_000_003)))
    got = jax.random.key_data(streams.fixed_key(7, streams.SAMPLE_GRID))
    assert np.array_equal(got, jax.random.key_data(jax.random.fold_in(root, 3_000_000)))
