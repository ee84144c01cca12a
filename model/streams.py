"""The PRNG streams drawn from a run's seed, named once (their values are the ones every run has used).

Training splits `jax.random.key(seed)` itself (model.loop.init_state, train_epoch). Everything else folds
an integer into that root key: a per-epoch stream folds `offset + epoch`, the sample grid one fixed
number. Epochs count from 1, so a per-epoch stream spans [offset + 1, offset + MAX_EPOCH]; with offsets
a million apart the streams stay disjoint for any run of at most MAX_EPOCH epochs (tests/test_streams.py),
and the sample grid's number (READINGS + 0) is no epoch's.
"""

from __future__ import annotations

import jax

VALIDATION_LOSS = 1_000_000  # chain noise of the validation objective at an epoch (model.loop)
EVALUATION = 2_000_000  # generated images of KID_inf/FID_inf at an epoch (model.loop)
READINGS = 3_000_000  # val_ll by AIS and the gradient noise at an epoch (model.readings)
SAMPLE_GRID = 3_000_000  # the latents of a trial's sample grids, the same every epoch (sweep.trainable)

PER_EPOCH = {"validation_loss": VALIDATION_LOSS, "evaluation": EVALUATION, "readings": READINGS}
FIXED = {"sample_grid": SAMPLE_GRID}
MAX_EPOCH = 999_999  # the most epochs a run may have before two per-epoch streams could meet


def epoch_key(seed: int, offset: int, epoch: int) -> jax.Array:
    """The key of stream `offset` (one of PER_EPOCH's values) at `epoch` (1..MAX_EPOCH) of seed `seed`."""
    return jax.random.fold_in(jax.random.key(seed), offset + epoch)


def fixed_key(seed: int, number: int) -> jax.Array:
    """The key of a fixed stream (one of FIXED's values) of seed `seed`."""
    return jax.random.fold_in(jax.random.key(seed), number)
