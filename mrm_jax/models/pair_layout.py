"""The shared-prompt pair layout: one row per pair, [prompt, chosen, rejected], the prompt once.

A pair's chosen and rejected sequences agree token for token up to the assistant turn (system
prompt, question, images). Under causal attention the hidden states of that common prefix are the
same in both sequences, so a row can hold the prefix once, then the chosen response, then the
rejected response, and attention recovers the two sequences exactly:
  sequence A = the row's first `a_length` tokens: [prefix, chosen response];
  sequence B = the row's tokens at `b_index`: [prefix, rejected response].
The model attends causally within A (one causal call on the row's start) and lets the rejected
response's own tokens attend, as queries, to sequence B under B's causal mask (a second call), so
the rejected tokens see the prefix and themselves, never the chosen ones, and the prefix is
attended to once (`common.pair_attention`). Every other operation is per token and runs once on
the packed row. M-RoPE positions of the rejected response continue
from the prefix's end exactly as in its own sequence, and the reward is read at each sequence's
last token, as for an unshared row.

The prefix is the longest common prefix of the two encodings (ids and positions), so it also covers
response tokens both answers begin with; it stops one token short of the shorter sequence, so each
response keeps a token of its own. When that prefix does not hold every vision token of both
sequences (their prompts differ before an image), the row falls back to the unshared form
[chosen sequence, rejected sequence] with the vision items of each (`shared = False`).

Batch arrays added by `collate_pairs` to `processor.collate`'s (B rows = B pairs):
  `pair_b_index [B, S]`  int32: packed position of each token of sequence B (0 past its end);
  `pair_r_index [B, R]`  int32: packed position of each of the rejected response's own tokens (the
                         tokens of B after the prefix; 0 past their end);
  `pair_lengths [B, 3]`  int32: tokens of A, of B, and of the common prefix;
  `pair_r_slot [B, T]`   int32: 1 + the index in `pair_r_index` of each packed position that is a
                         rejected response's own token, 0 for the others;
  `reward_index [B, 2]`  int32: packed position of the chosen and of the rejected reward token.
S (`sub_len`) is a sequence bucket that holds A and B; A is computed on the row's first S
positions. R (`own_len`) is a bucket holding the rejected response's own tokens. A row's length T
is a bucket of `mrm_jax.data.pipeline.row_buckets`. Zero padding of every array stays valid (an
all-zero row is an empty pair).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

PAIR_KEYS = ("pair_b_index", "pair_r_index", "pair_lengths", "pair_r_slot", "reward_index")


@dataclasses.dataclass
class EncodedPair:
  """One packed pair row (numpy, unpadded); quacks like `processor.Encoded` for `collate`."""

  input_ids: np.ndarray  # [T] int32
  position_ids: np.ndarray  # [3, T] int32
  pixel_values: np.ndarray  # [P, patch_dim] float32
  grid_thw: np.ndarray  # [n, 3] int32
  patch_arrays: dict[str, np.ndarray]
  a_length: int  # sequence A = tokens [0, a_length)
  b_index: np.ndarray  # [len(B)] int32: packed positions of sequence B
  shared: bool  # False: the unshared fallback [chosen, rejected]
  truncated: bool = False
  vision_kinds: tuple[str, ...] = ()

  @property
  def length(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def num_patches(self) -> int:
    return int(self.pixel_values.shape[0])

  @property
  def sub_length(self) -> int:
    """Tokens of the longer of the two sequences (what the attention bucket must hold)."""
    return max(self.a_length, int(self.b_index.shape[0]))

  @property
  def prefix_length(self) -> int:
    return int(np.sum(self.b_index < self.a_length))

  @property
  def own_length(self) -> int:
    """The rejected response's own tokens (sequence B after the common prefix)."""
    return int(self.b_index.shape[0]) - self.prefix_length


def common_prefix(chosen, rejected) -> int:
  """Tokens the two encodings share from the start (ids and M-RoPE positions), at most one less
  than the shorter one."""
  n = min(chosen.length, rejected.length) - 1
  if n <= 0:
    return 0
  same = (chosen.input_ids[:n] == rejected.input_ids[:n]) & np.all(
    chosen.position_ids[:, :n] == rejected.position_ids[:, :n], axis=0
  )
  return n if same.all() else int(np.argmin(same))


def packed_length(chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> int:
  """Tokens of the packed row of two token-id lists (the prefix counted once)."""
  n = min(len(chosen_ids), len(rejected_ids)) - 1
  p = 0
  while p < n and chosen_ids[p] == rejected_ids[p]:
    p += 1
  return len(chosen_ids) + len(rejected_ids) - p


def _vision_positions(ids: np.ndarray, vision_token_ids: Sequence[int]) -> np.ndarray:
  return np.nonzero(np.isin(ids, np.asarray(vision_token_ids)))[0]


def pack(
  chosen,
  rejected,
  vision_token_ids: Sequence[int],
  patch_arrays_fn: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> EncodedPair:
  """Two `processor.Encoded` of one pair (the rejected one reusing the chosen one's vision, or with
  its own) → the packed row. `patch_arrays_fn(grid_thw)`: the family's per-patch arrays (for the
  fallback row, which carries both sequences' vision items)."""
  p = common_prefix(chosen, rejected)
  a = chosen.length
  vision_c = _vision_positions(chosen.input_ids, vision_token_ids)
  vision_r = _vision_positions(rejected.input_ids, vision_token_ids)
  same_items = np.array_equal(chosen.grid_thw, rejected.grid_thw)
  shared = same_items and np.all(vision_c < p) and np.all(vision_r < p)
  truncated = bool(chosen.truncated or rejected.truncated)
  if shared:
    own = np.arange(p, rejected.length)
    return EncodedPair(
      np.concatenate([chosen.input_ids, rejected.input_ids[p:]]).astype(np.int32),
      np.concatenate([chosen.position_ids, rejected.position_ids[:, p:]], 1).astype(np.int32),
      chosen.pixel_values,
      chosen.grid_thw,
      chosen.patch_arrays,
      a,
      np.concatenate([np.arange(p), a + own - p]).astype(np.int32),
      True,
      truncated,
      tuple(chosen.vision_kinds),
    )
  grid = np.concatenate([chosen.grid_thw, rejected.grid_thw], 0).astype(np.int32).reshape(-1, 3)
  return EncodedPair(
    np.concatenate([chosen.input_ids, rejected.input_ids]).astype(np.int32),
    np.concatenate([chosen.position_ids, rejected.position_ids], 1).astype(np.int32),
    np.concatenate([chosen.pixel_values, rejected.pixel_values], 0),
    grid,
    patch_arrays_fn(grid),
    a,
    (a + np.arange(rejected.length)).astype(np.int32),
    False,
    truncated,
    tuple(chosen.vision_kinds) + tuple(rejected.vision_kinds),
  )


def layout_arrays(pairs: Sequence[EncodedPair], seq_len: int, sub_len: int, own_len: int) -> dict:
  """The `PAIR_KEYS` arrays of a batch of packed rows (module docstring)."""
  b = len(pairs)
  out = {
    "pair_b_index": np.zeros((b, sub_len), np.int32),
    "pair_r_index": np.zeros((b, own_len), np.int32),
    "pair_lengths": np.zeros((b, 3), np.int32),
    "pair_r_slot": np.zeros((b, seq_len), np.int32),
    "reward_index": np.zeros((b, 2), np.int32),
  }
  for i, e in enumerate(pairs):
    nb, prefix = int(e.b_index.shape[0]), e.prefix_length
    if e.sub_length > sub_len or e.length > seq_len or e.own_length > own_len:
      raise ValueError(
        f"pair {i} needs {e.sub_length} attention / {e.own_length} own / {e.length} row tokens, "
        f"more than {sub_len} / {own_len} / {seq_len}"
      )
    own = e.b_index[prefix:]
    out["pair_b_index"][i, :nb] = e.b_index
    out["pair_r_index"][i, : len(own)] = own
    out["pair_r_slot"][i, own] = np.arange(1, len(own) + 1)
    out["pair_lengths"][i] = (e.a_length, nb, prefix)
    out["reward_index"][i] = (e.a_length - 1, e.b_index[-1])
  return out
