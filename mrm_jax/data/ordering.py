"""The order a pipeline reads its records in, epoch by epoch.

Without length grouping an epoch is the seeded permutation `default_rng([seed, epoch])`. With it,
that permutation is cut into groups of `group_batches` batches, each group is sorted by length
(longest first, ties in permutation order) and cut into batches, and the batches of the whole
epoch are visited in a second seeded order, `default_rng([seed, epoch, 1])`, so long and short
batches interleave. A batch then holds pairs of similar length and takes the smallest sequence
bucket they fit: the padding of a random batch (its longest pair) mostly disappears, while which
pairs meet in a batch stays random from epoch to epoch. The order is a pure function of
(seed, epoch, lengths), so a restored position replays exactly the batches that followed it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def epoch_order(
  n: int,
  *,
  seed: int,
  epoch: int,
  shuffle: bool = True,
  lengths: Sequence[int] | None = None,
  batch_size: int = 1,
  group_batches: int = 0,
) -> np.ndarray:
  """Record indices of one epoch, in reading order (see the module docstring)."""
  order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
  if lengths is None or group_batches <= 1 or batch_size < 1:
    return order
  lengths = np.asarray(lengths)
  if lengths.shape != (n,):
    raise ValueError(f"{lengths.shape[0]} lengths for {n} records")
  group = batch_size * group_batches
  grouped = np.concatenate(
    [
      chunk[np.argsort(-lengths[chunk], kind="stable")]
      for chunk in (order[i : i + group] for i in range(0, n, group))
    ]
  )
  full = n // batch_size * batch_size
  batches = grouped[:full].reshape(-1, batch_size)
  if shuffle:
    batches = batches[np.random.default_rng([seed, epoch, 1]).permutation(len(batches))]
  return np.concatenate([batches.ravel(), grouped[full:]])
