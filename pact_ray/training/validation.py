"""Held-out validation with common random numbers.

The validation split is fixed by the data seed alone and is never trained on. Every
evaluation scores the same samples at the same timesteps with the same noise, whatever the
variant or the training seed: two runs are then compared on identical draws, so their
difference carries no sampling noise of the evaluation itself (common random numbers), and
a paired comparison over training seeds sees only what training changed.

- :func:`split_indices`: the train / validation partition of a data set's sample ids.
- :func:`eval_sample_ids`: an even spread of at most ``limit`` of them.
- :func:`stratified_timesteps`: the flow timesteps of an evaluation, the quantile midpoints
  of the training distribution (TRELLIS's logit-normal), so that the mean over them is a
  stratified estimate of the training objective's expectation over t.
- :func:`validation_generator`: the generator of one sample's noise at one timestep.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch

from pact_ray.errors import ConfigError

VALIDATION_STREAM = 0x5EED_0F_7A1  # separates validation draws from any training draw of the same data seed


def split_indices(n: int, val_fraction: float, data_seed: int, min_train: int = 1,
                  groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids) of ``n`` samples: a permutation seeded by ``data_seed``,
    its first ``ceil(n * val_fraction)`` ids (at least 1) held out; both sorted. Raises
    :class:`ConfigError` when fewer than ``min_train`` samples would be left to train on.

    ``groups`` (one label per sample, e.g. the object a view of PAct's data shows) holds out
    whole groups instead: the permutation is of the distinct labels, in sorted order, and its
    first ``ceil(G * val_fraction)`` are held out, so no object is seen in training and scored
    in validation. Where every sample is its own group in index order, the split is the
    per-sample one."""
    if groups is None:
        labels, members = np.arange(n), None
    else:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must give one label per sample ({n}), got shape {groups.shape}.")
        labels, members = np.unique(groups, return_inverse=True)
    g = len(labels)
    g_val = max(1, math.ceil(g * val_fraction))
    order = np.random.Generator(np.random.PCG64([VALIDATION_STREAM, data_seed])).permutation(g)
    held = np.zeros(g, bool)
    held[order[:g_val]] = True
    val = np.flatnonzero(held if members is None else held[members])
    what = "samples" if members is None else f"samples of {g} object{'' if g == 1 else 's'}"
    if n - len(val) < min_train:
        raise ConfigError(f"{n} {what} hold out {len(val)} for validation (val_fraction {val_fraction}), "
                          f"leaving fewer than the {min_train} a training batch needs")
    train = np.setdiff1d(np.arange(n), val)
    return train, val


def eval_sample_ids(n: int, limit: int) -> np.ndarray:
    """``limit`` sample positions spread evenly over a split of ``n`` samples (all of them if
    limit is 0 or >= n)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def stratified_timesteps(count: int, mean: float = 1.0, std: float = 1.0) -> torch.Tensor:
    """[count] timesteps in (0, 1): ``sigmoid(mean + std * z_i)`` with ``z_i`` the standard
    normal quantiles at ``(i + 1/2) / count`` (the logit-normal training schedule of
    ``flow.sample_t``, stratified)."""
    normal = NormalDist()
    z = [normal.inv_cdf((i + 0.5) / count) for i in range(count)]
    return torch.sigmoid(torch.tensor([mean + std * v for v in z], dtype=torch.float32))


def validation_generator(data_seed: int, sample_id: int, timestep_index: int) -> torch.Generator:
    """The generator of validation sample ``sample_id``'s noise at timestep ``timestep_index``:
    a function of the data alone, the same for every variant and training seed."""
    key = np.random.SeedSequence([VALIDATION_STREAM, data_seed, sample_id, timestep_index]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(key[0] % (2**63 - 1)))
