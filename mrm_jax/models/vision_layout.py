"""Host-side (numpy) layout of per-item vision attention and of shared vision tokens.

The vision tower keeps its patches in one flat `[P, ...]` sequence (every per-patch op runs on it),
but attention must not cross items (images, video frames, Qwen2.5-VL windows). Attending over the
whole sequence with a block-diagonal mask costs P² however many items there are; instead the model
gathers each item's patches into one row of a `[rows, width]` grid, attends row by row under a
padding mask (cuDNN takes it as per-row sequence lengths) and gathers the outputs back. Attention
is order-free over its keys, so a row lists its item's patches in patch order.

For a batch array `<name>_segment_ids [P]` (0 = padding patch, one id per item; ids need not be
contiguous in patch order: windows are not) `collate` adds, with `<prefix>` from `LAYOUTS`:
  `<prefix>_index [rows, width]`  int32: patch index of each slot (0 in empty slots),
  `<prefix>_lengths [rows]`       int32: patches in each row (0 for empty rows),
  `<prefix>_slot [P, 2]`          int32: (row, column) of each patch ((0, 0) for padding patches).
Zero padding of any of them (micro-batches padded to a common shape) stays valid.

`vision_token_offset [B]` int32: where row b's placeholders start in the merged vision tokens. Rows
sharing their vision (a pair's chosen and rejected rows) point to the same tokens, so each pair's
images go through the tower once.

Static sizes: `rows` and `width` are rounded up on `ladder` (steps of at most 25%), so a run
compiles few shapes; callers that stack several collated sub-batches pass common sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

# segment-id array → prefix of its layout arrays
LAYOUTS = {"vision_segment_ids": "vision_items", "vision_window_segment_ids": "vision_windows"}
LAYOUT_SUFFIXES = ("_index", "_lengths", "_slot")


def ladder(n: int, unit: int = 1) -> int:
  """`n` rounded up to the next of unit·{4, 5, 6, 7}·2^k (or 1..4 units): at most 25% more."""
  n = -(-int(n) // unit)
  if n <= 4:
    return max(n, 0) * unit
  k = 1 << (n.bit_length() - 3)  # a quarter of the largest power of two <= n
  return -(-n // k) * k * unit


def segment_items(segment_ids: np.ndarray) -> list[np.ndarray]:
  """The patch indices of each item (nonzero id), items in order of first appearance."""
  seg = np.asarray(segment_ids).reshape(-1)
  ids, first = np.unique(seg[seg > 0], return_index=True)
  order = ids[np.argsort(first, kind="stable")]
  if not len(order):
    return []
  sort = np.argsort(seg, kind="stable")
  starts = np.searchsorted(seg[sort], order, side="left")
  ends = np.searchsorted(seg[sort], order, side="right")
  return [sort[s:e] for s, e in zip(starts, ends)]


def need(segment_ids: np.ndarray) -> tuple[int, int]:
  """(items, patches of the largest item) of one segment-id array."""
  items = segment_items(segment_ids)
  return len(items), max((len(i) for i in items), default=0)


def sizes(needs: Iterable[tuple[int, int]]) -> tuple[int, int]:
  """Static (rows, width) covering every `(items, largest)` of `needs`, on the ladder."""
  needs = list(needs)
  rows = max((n for n, _ in needs), default=0)
  width = max((w for _, w in needs), default=0)
  return ladder(max(rows, 1)), ladder(max(width, 1))


def batch_needs(examples) -> dict[str, tuple[int, int]]:
  """`{segment-id array: (items, largest item)}` of the batch `collate` would build from `examples`
  (`Encoded`s, each sending its own vision): an item per image / video frame, plus the family's
  own `*_segment_ids` patch arrays (Qwen2.5-VL's windows)."""
  frames = [
    (int(h * w), int(t)) for e in examples for t, h, w in np.asarray(e.grid_thw).reshape(-1, 3)
  ]
  out = {"vision_segment_ids": (sum(t for _, t in frames), max((n for n, _ in frames), default=0))}
  for name in LAYOUTS:
    if name == "vision_segment_ids":
      continue
    got = [need(e.patch_arrays[name]) for e in examples if name in e.patch_arrays]
    if got:
      out[name] = (sum(n for n, _ in got), max(w for _, w in got))
  return out


def common_sizes(
  batches_needs: Iterable[Mapping[str, tuple[int, int]]],
) -> dict[str, tuple[int, int]]:
  """Static layout sizes fitting every one of several batches (sub-batches stacked together)."""
  by_name: dict[str, list] = {}
  for needs in batches_needs:
    for name, n in needs.items():
      by_name.setdefault(name, []).append(n)
  return {name: sizes(ns) for name, ns in by_name.items()}


def item_layout(
  segment_ids: np.ndarray, rows: int | None = None, width: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(index [rows, width], lengths [rows], slot [P, 2])` of one segment-id array (module doc)."""
  seg = np.asarray(segment_ids).reshape(-1)
  items = segment_items(seg)
  auto_rows, auto_width = sizes([(len(items), max((len(i) for i in items), default=0))])
  rows = auto_rows if rows is None else int(rows)
  width = auto_width if width is None else int(width)
  if len(items) > rows or any(len(i) > width for i in items):
    raise ValueError(
      f"{len(items)} vision items of up to {max(len(i) for i in items)} patches do "
      f"not fit a {rows} x {width} attention layout"
    )
  index = np.zeros((rows, width), np.int32)
  lengths = np.zeros((rows,), np.int32)
  slot = np.zeros((seg.shape[0], 2), np.int32)
  for r, patches in enumerate(items):
    n = len(patches)
    index[r, :n] = patches
    lengths[r] = n
    slot[patches, 0] = r
    slot[patches, 1] = np.arange(n)
  return index, lengths, slot


def add_layouts(batch: dict, sizes_by_name: Mapping[str, tuple[int, int]] | None = None) -> dict:
  """Adds the attention layout of every segment-id array of `LAYOUTS` present in `batch` (in place,
  also returned); `sizes_by_name[name] = (rows, width)` fixes the static sizes."""
  for name, prefix in LAYOUTS.items():
    if name not in batch or np.shape(batch[name])[0] == 0:
      continue
    rows, width = (sizes_by_name or {}).get(name, (None, None))
    index, lengths, slot = item_layout(batch[name], rows, width)
    batch[f"{prefix}_index"], batch[f"{prefix}_lengths"] = index, lengths
    batch[f"{prefix}_slot"] = slot
  return batch


def token_offsets(
  tokens_per_row: Iterable[int], share: Iterable[int | None] | None = None
) -> np.ndarray:
  """`vision_token_offset [B]`: row b's first merged vision token. Rows with `share[b] = a` reuse
  row a's tokens (and bring none of their own); the others follow each other in row order."""
  counts = list(tokens_per_row)
  share = list(share) if share is not None else [None] * len(counts)
  out, cur = np.zeros((len(counts),), np.int32), 0
  for b, (n, a) in enumerate(zip(counts, share)):
    if a is None:
      out[b], cur = cur, cur + int(n)
  for b, a in enumerate(share):
    if a is not None:
      if share[a] is not None:
        raise ValueError(f"row {b} shares the vision of row {a}, which shares another row's")
      out[b] = out[a]
  return out
