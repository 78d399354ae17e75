"""The training input pipeline: pair files → static-shape pair batches, deterministic and resumable.

Order. Epoch e visits the N records in the order `permutation(N)` drawn by numpy from
`(seed, e)` (or file order with `shuffle=False`), grouped by length when asked
(`mrm_jax.data.ordering`). The epochs follow each other in one global stream (position
g = e·N + i), cut into global batches of B = `batch_size` pairs that run on across epoch boundaries.

Lanes. Slot j of every global batch is filled from lane j, the stream positions j, j+B, j+2B, ...:
the next good record of the lane (a skipped record makes its lane take the lane's next one, so
the lane runs one batch ahead from then on). Without skips, batch k is exactly stream positions
[kB, (k+1)B), the records of one length group. Process h of H fills the lanes
[h·B/H, (h+1)·B/H) and encodes only their records: the global batch, the concatenation of the
processes' blocks, is the same for every H, skips included, because a lane never depends on
another lane's records.

State. The iterator state is the stream position of each lane's next record, saved as
`{"epoch", "position"}` where the least advanced lanes stand (lane j's next record is then at
e·N + position + j) plus `"lanes_ahead"`, `{lane: batches}` for the lanes that skipped more records
and so run ahead (usually empty). It names global positions, so a state saved on H processes
restores on any other number (the trainer merges the processes' lanes, `lanes_state`);
`set_state(s)` replays exactly the batches an uninterrupted run would have produced next. A state
with no lane ahead also restores with another batch size (the stream continues at its position).

Work. tf.data runs the model's numpy `encode` over the index stream with a parallel,
deterministic `map`, drops the records that failed, batches, and `collate`s each batch to the
smallest configured sequence length (and vision-patch budget) that fits, then prefetches. The
numpy objects themselves never enter the TF graph: workers park them in a keyed table and only
the keys flow through tf.data, so the pipeline works for any example/batch structure the model
uses. Chosen and rejected are rows i and B+i of a batch, or both in row i in the shared-prompt
layout (mrm_jax/models/pair_layout.py); `strength` (default 0) rides along. Between the parallel
`encode` and `collate` a sequential stage deals the encoded records to their lanes and emits a
batch's records once every lane has its next one.

Bad input. A record whose JSON is broken, that lacks a field, has an empty response, names an
image outside the image root, or whose image cannot be decoded is skipped, counted, and logged
once with its file:line. Once `min_checked` records have been read, a skip rate above
`max_skip_rate` stops the run with a UserError (with several processes the trainer checks the
rate over all of them, `check_skip_rate`, since none sees the others' records).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mrm_jax.data.ordering import epoch_order
from mrm_jax.data.records import normalize_pair, pair_to_scoring, resolve_image
from mrm_jax.errors import UserError, at
from mrm_jax.io import is_json_list, read_json_or_jsonl, scan_jsonl

log = logging.getLogger(__name__)

# Exceptions that mean "this record cannot be encoded" (as opposed to a bug): our own
# validation errors, unreadable/undecodable files (PIL's UnidentifiedImageError is an OSError,
# truncated PNGs raise SyntaxError), and value errors from decoders.
BAD_INPUT_ERRORS = (UserError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One input record: where it came from, the raw dict (None if unreadable) and its image root."""

  where: str
  record: dict | None
  image_root: str
  error: str | None = None


def load_entries(
  path: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> list[Entry]:
  """Reads a pair file (canonical or LLaMA-Factory; JSONL or a JSON list) tolerantly.

  A JSONL line that the project's JSON reader refuses (malformed, not UTF-8, NaN, a number too
  large, nested too deeply, not an object) becomes an Entry with `error` set, so it is skipped and
  counted like any other bad record, and the other records keep their positions. A JSON list
  cannot be partially read: a broken one is a UserError. The image root defaults to the
  file's folder (DESIGN §3.2).
  """
  path = Path(path)
  if not path.is_file():
    raise UserError(f"{path}: no such file")
  root = str(image_root if image_root else path.resolve().parent)
  if is_json_list(path):
    return [Entry(at(path, n), r, root) for n, r in read_json_or_jsonl(path)]
  return [Entry(at(path, n), r, root, err) for n, r, err in scan_jsonl(path)]


def check_pair(entry: Entry) -> tuple[dict, list[Path]]:
  """Validates an entry → (canonical pair, resolved image paths); UserError names file:line."""
  if entry.error is not None:
    raise UserError(f"{entry.where}: {entry.error}")
  pair = normalize_pair(entry.record, entry.where)
  for key in ("chosen", "rejected"):
    if not pair[key].strip():
      raise UserError(f"{entry.where}: empty '{key}' response")
  paths = [resolve_image(p, entry.image_root, entry.where) for p in pair["images"]]
  for p, name in zip(paths, pair["images"]):
    if not p.is_file():
      raise UserError(f"{entry.where}: image '{name}' not found under {entry.image_root}")
  if pair.get("videos"):
    pair["videos"] = [_frames(v, entry) for v in pair["videos"]]
  return pair, paths


_FRAME_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _frames(video, entry: Entry) -> list[str]:
  """A video as the processor takes it (a list of frame paths): a folder of frames (MM-RLHF's
  layout) becomes its image files in sorted order, relative to the image root."""
  if isinstance(video, list):
    return video
  folder = resolve_image(str(video), entry.image_root, entry.where)
  frames = (
    sorted(f for f in folder.iterdir() if f.suffix.lower() in _FRAME_EXTS)
    if folder.is_dir()
    else []
  )
  if not frames:
    raise UserError(
      f"{entry.where}: video '{video}' is not a folder of frames under {entry.image_root}"
    )
  root = Path(entry.image_root).resolve()
  return [f.relative_to(root).as_posix() for f in frames]


def _pick(sizes: Sequence[int], need: int, what: str) -> int:
  for s in sorted(sizes):
    if s >= need:
      return s
  raise UserError(
    f"a batch needs {need} {what}, more than the largest configured ({max(sizes)}); "
    f"raise it or lower the batch size / image resolution"
  )


def row_buckets(seq_lens: Sequence[int]) -> tuple[int, ...]:
  """Static row lengths of the shared-prompt layout for the sequence buckets `seq_lens`: each of a
  pair's two sequences fits the largest bucket, as in the unshared layout, so a row holds up to
  twice it (less the common prompt)."""
  top = max(seq_lens)
  return tuple(sorted(set(seq_lens) | {top + s for s in seq_lens}))


def own_buckets(seq_lens: Sequence[int]) -> tuple[int, ...]:
  """Static lengths of a shared-prompt batch's rejected-response block: the sequence buckets and,
  below the smallest, its halves down to 16 (responses are often much shorter than prompts)."""
  low = min(seq_lens)
  halves = [low >> k for k in range(1, 16) if low >> k >= 16]
  return tuple(sorted(set(seq_lens) | set(halves)))


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def pick_patch_budget(need: int, budgets: Sequence[int] | None) -> int:
  """The vision-patch budget of a batch needing `need` patches: the smallest configured one that
  fits, or (none configured) the next power of two, at least 16 (a multiple of merge_size**2)."""
  return _pick(budgets, need, "vision patches") if budgets else max(16, _next_pow2(need))


@dataclasses.dataclass
class _Failure:
  """An exception raised in a tf.data worker, parked to be re-raised in the consumer."""

  error: BaseException


class PairPipeline:
  """Iterator of pair batches (see the module docstring).

  encode_fn(record, image_root, max_len, where) -> example: the model's encoder of one scoring
    record (`images`, `question`, `answer`, `system?`); called with max_len = max(seq_lens).
  collate_fn(examples, seq_len, patch_budget) -> dict of numpy arrays: the 2B examples
    [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] padded to static shapes.
  length_fn(example) -> tokens; patches_fn(example) -> vision patches (for bucketing).
  patch_budgets: the allowed vision-patch counts per batch; None = the next power of two (at
    least 16) of what the batch needs (few distinct shapes without any configuration).
  lengths, group_batches: estimated tokens per entry and the batches per length group of
    `mrm_jax.data.ordering.epoch_order` (0 = no grouping).
  share_vision: each pair's images are processed and sent once: the rejected response is encoded
    with `encode_fn(..., vision=chosen_example)` (reusing its processed images) and collated with
    `collate_fn(..., share=[None] * B + [0..B-1])` (its rows read the chosen rows' vision tokens).
  encode_pair_fn, collate_pairs_fn: given, batches take the shared-prompt layout
    (mrm_jax/models/pair_layout.py), one row per pair: `encode_pair_fn(chosen, rejected,
    image_root, max_len, where) -> packed pair` and `collate_pairs_fn(pairs, seq_len, sub_len,
    own_len, patch_budget)`, `sub_len` being the bucket of the pairs' longer sequence and
    `own_len` that of their rejected responses' own tokens (`own_buckets`).
  """

  def __init__(
    self,
    entries: Sequence[Entry],
    *,
    encode_fn: Callable,
    collate_fn: Callable,
    length_fn: Callable[[Any], int],
    patches_fn: Callable[[Any], int],
    batch_size: int,
    seq_lens: Sequence[int],
    patch_budgets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    max_skip_rate: float = 0.01,
    min_checked: int = 100,
    num_parallel_calls: int = 4,
    prefetch: int = 2,
    lengths: Sequence[int] | None = None,
    group_batches: int = 0,
    share_vision: bool = False,
    encode_pair_fn: Callable | None = None,
    collate_pairs_fn: Callable | None = None,
  ):
    if not entries:
      raise UserError("the training data holds no records")
    if batch_size % process_count:
      raise UserError(
        f"batch size {batch_size} is not divisible by the number of hosts {process_count}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.entries = list(entries)
    self.encode_fn, self.collate_fn = encode_fn, collate_fn
    self.length_fn, self.patches_fn = length_fn, patches_fn
    self.local_batch = batch_size // process_count
    self.seq_lens = tuple(sorted(int(s) for s in seq_lens))
    self.patch_budgets = tuple(sorted(patch_budgets)) if patch_budgets else None
    self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
    self.process_index, self.process_count = process_index, process_count
    self.lengths, self.group_batches = lengths, int(group_batches)
    self.share_vision = bool(share_vision)
    if (encode_pair_fn is None) != (collate_pairs_fn is None):
      raise ValueError("the shared-prompt layout needs both encode_pair_fn and collate_pairs_fn")
    self.encode_pair_fn, self.collate_pairs_fn = encode_pair_fn, collate_pairs_fn
    self.unshared_pairs = 0  # shared-prompt layout: pairs whose prompts differ
    self.max_skip_rate, self.min_checked = float(max_skip_rate), int(min_checked)
    self.num_parallel_calls, self.prefetch = max(1, int(num_parallel_calls)), max(1, int(prefetch))
    self.shard_len = len(range(process_index, len(self.entries), process_count))
    if self.shard_len == 0:
      raise UserError(
        f"host {process_index} of {process_count} gets no records ({len(self.entries)} in all)"
      )
    self._epoch, self._position = 0, 0
    self.seen = self.skipped = 0
    self._logged: set[int] = set()
    self._table: dict[int, Any] = {}
    self._lock = threading.Lock()
    self._next_key = 0
    self._it = None

  # ------------------------------------------------------------------ order and state
  # Stream position of the next record of each of this process's lanes, created at the first use
  # (lanes j start at position j).
  _next: np.ndarray | None = None
  # Records this process has encoded (read-ahead included): what its share of the work was; and
  # `seen` when this run's reading started (a restored count).
  encoded = 0
  _seen_at_start = 0

  @property
  def global_batch(self) -> int:
    return self.local_batch * self.process_count

  @property
  def lanes(self) -> range:
    """The slots of the global batch this process fills: lane j is slot j of every batch."""
    first = self.process_index * self.local_batch
    return range(first, first + self.local_batch)

  def set_process(self, index: int, count: int) -> None:
    """Makes this pipeline process `index` of `count` (its lanes: the block of the global batch it
    fills), at the stream's start: call it before `set_state`."""
    if self.global_batch % count:
      raise UserError(
        f"batch size {self.global_batch} is not divisible by the number of blocks {count}"
      )
    if not 0 <= index < count:
      raise ValueError(f"process_index {index} not in [0, {count})")
    self.local_batch = self.global_batch // count
    self.process_index, self.process_count = index, count
    self._next = None
    self._reset()

  def _positions(self) -> np.ndarray:
    if self._next is None:
      self._next = np.asarray(self.lanes, np.int64)
    return self._next

  def order(self, epoch: int) -> np.ndarray:
    """The record indices of `epoch` in reading order (stream positions e·N .. e·N + N-1)."""
    return epoch_order(
      len(self.entries),
      seed=self.seed,
      epoch=epoch,
      shuffle=self.shuffle,
      lengths=self.lengths,
      batch_size=self.global_batch,
      group_batches=self.group_batches,
    )

  def shard(self, epoch: int) -> np.ndarray:
    """The record indices of `epoch` on this process's lanes, in order: what it reads of the
    epoch when no record is skipped."""
    n, b = len(self.entries), self.global_batch
    mine = np.isin((epoch * n + np.arange(n)) % b, self._positions() % b)
    return self.order(epoch)[mine]

  def lane_positions(self) -> dict[int, int]:
    """`{lane: stream position of its next record}` for this process's lanes."""
    return {j: int(p) for j, p in zip(self.lanes, self._positions())}

  def get_state(self) -> dict:
    """The iterator state (JSON). With several processes it covers this process's lanes only:
    the trainer merges every process's `lane_positions` with `lanes_state`."""
    return lanes_state(
      self.lane_positions(),
      self.global_batch,
      len(self.entries),
      seen=self.seen,
      skipped=self.skipped,
      seed=self.seed,
    )

  def set_state(self, state: dict) -> None:
    """Continues from `state` (this or any other process count's, see the module docstring)."""
    if "seed" in state and state["seed"] != self.seed:
      raise UserError(
        f"data iterator state was saved with seed={state['seed']}, this run has seed={self.seed}"
      )
    positions = state_positions(state, self.global_batch, len(self.entries))
    self._next = positions[self.lanes.start : self.lanes.stop].copy()
    # the counts are global: one process keeps them, several leave them to the trainer
    whole = self.process_count == 1
    self.seen = int(state.get("seen", 0)) if whole else 0
    self.skipped = int(state.get("skipped", 0)) if whole else 0
    self._seen_at_start = self.seen
    self._reset()

  @property
  def read_ahead(self) -> int:
    """Records encoded but not (yet) part of a delivered batch: prefetched, or in flight."""
    return self.encoded - (self.seen - self._seen_at_start)

  def check_skip_rate(self, seen: int, skipped: int) -> None:
    """UserError once `seen` >= `min_checked` records were read and more than `max_skip_rate` of
    them were skipped."""
    if seen >= self.min_checked and skipped > self.max_skip_rate * seen:
      raise UserError(
        f"{skipped} of {seen} records could not be used "
        f"({skipped / seen:.1%} > max_skip_rate {self.max_skip_rate:.1%}); "
        "see the warnings above for file:line of each"
      )

  def _reset(self):
    self._it = None
    with self._lock:
      self._table.clear()

  # ------------------------------------------------------------------ workers
  def _park(self, obj) -> int:
    with self._lock:
      key = self._next_key
      self._next_key += 1
      self._table[key] = obj
    return key

  def _take(self, key: int):
    with self._lock:
      return self._table.pop(int(key))

  def _skip(self, index: int, reason: str) -> None:
    with self._lock:
      first = index not in self._logged
      self._logged.add(index)
    if first:
      log.warning("skipping record %s", reason)

  def _encode(self, epoch, position, index) -> np.int64:
    """tf.data worker: entry → parked (offset, example pair, strength); -1 when skipped."""
    entry = self.entries[int(index)]
    max_len = self.seq_lens[-1]
    try:
      pair, _ = check_pair(entry)
      chosen, rejected = pair_to_scoring(pair)
      if pair.get("videos"):
        chosen["videos"] = rejected["videos"] = pair["videos"]
      if self.encode_pair_fn is not None:
        examples = self.encode_pair_fn(chosen, rejected, entry.image_root, max_len, entry.where)
        if not examples.shared:
          self._count_unshared(entry)
      else:
        first = self.encode_fn(chosen, entry.image_root, max_len, entry.where)
        reuse = {"vision": first} if self.share_vision else {}
        second = self.encode_fn(rejected, entry.image_root, max_len, entry.where, **reuse)
        examples = (first, second)
    except BAD_INPUT_ERRORS as e:
      msg = str(e) if isinstance(e, UserError) else f"{entry.where}: {type(e).__name__}: {e}"
      self._skip(int(index), msg)
      return np.int64(-1)
    except (
      Exception
    ) as e:  # a bug, not bad data: carried to the consumer and raised there as itself
      return np.int64(self._park(_Failure(e)))
    offset = int(epoch) * self.shard_len + int(position)
    return np.int64(self._park((offset, examples, float(pair.get("strength") or 0.0))))

  def _encode_counted(self, epoch, position, index) -> np.int64:
    with self._lock:
      self.encoded += 1
    return self._encode(epoch, position, index)

  def _collate_group(self, key) -> np.int64:
    """tf.data worker: a parked `_LaneGroup` → parked (lane positions after it, batch)."""
    group = self._take(key)
    if isinstance(group, _Failure):
      return np.int64(self._park(group))
    try:
      _, batch = self._collate_items(group.items)
    except (
      Exception
    ) as e:  # raised in the consumer's thread, where the CLI turns UserError into one line
      return np.int64(self._park(_Failure(e)))
    return np.int64(self._park((group.after, batch)))

  def _count_unshared(self, entry: Entry) -> None:
    with self._lock:
      self.unshared_pairs += 1
      n = self.unshared_pairs
    if n & (n - 1) == 0:  # the 1st, 2nd, 4th, ... such pair
      log.info(
        "%s: the pair's prompts differ, so it is encoded unshared ([chosen, rejected] in one "
        "row); %d such pair(s) so far",
        entry.where,
        n,
      )

  def _collate_items(self, items):
    if self.collate_pairs_fn is not None:
      pairs = [it[1] for it in items]
      rows = row_buckets(self.seq_lens)
      seq_len = _pick(rows, max(self.length_fn(e) for e in pairs), "tokens")
      sub_len = _pick(self.seq_lens, max(e.sub_length for e in pairs), "tokens")
      own_len = _pick(own_buckets(self.seq_lens), max(e.own_length for e in pairs), "tokens")
      budget = pick_patch_budget(sum(int(self.patches_fn(e)) for e in pairs), self.patch_budgets)
      batch = dict(self.collate_pairs_fn(pairs, seq_len, sub_len, own_len, budget))
      batch["strength"] = np.asarray([it[2] for it in items], np.float32)
      return items[-1][0], batch
    examples = [it[1][0] for it in items] + [it[1][1] for it in items]
    seq_len = _pick(self.seq_lens, max(self.length_fn(e) for e in examples), "tokens")
    b = len(items)
    kw = {"share": [None] * b + list(range(b))} if self.share_vision else {}
    with_vision = examples[:b] if self.share_vision else examples
    need = sum(int(self.patches_fn(e)) for e in with_vision)
    budget = pick_patch_budget(need, self.patch_budgets)
    batch = dict(self.collate_fn(examples, seq_len, budget, **kw))
    batch["strength"] = np.asarray([it[2] for it in items], np.float32)
    return items[-1][0], batch

  def _index_stream(self, start: np.ndarray):
    """(epoch, stream position, record index) of the local lanes' records, one per lane in turn,
    each lane from its own next position; with `num_epochs`, until a lane runs out."""
    n, b = len(self.entries), self.global_batch
    end = None if self.num_epochs is None else self.num_epochs * n
    orders: dict[int, np.ndarray] = {}
    for r in itertools.count():
      positions = [int(p) + r * b for p in start]
      orders = {e: orders[e] if e in orders else self.order(e) for e in {g // n for g in positions}}
      for g in positions:
        if end is not None and g >= end:
          return
        yield g // n, g, orders[g // n][g % n]

  def _dataset(self):
    import tensorflow as tf  # noqa: PLC0415 - optional: the accelerator box has no TensorFlow

    start = self._positions().copy()
    deal = _LaneAssembler(self, start)  # one per dataset: a replaced iterator keeps its own
    ds = tf.data.Dataset.from_generator(
      lambda: self._index_stream(start), output_signature=(tf.TensorSpec((), tf.int64),) * 3
    )
    ds = ds.map(
      lambda e, g, i: (
        tf.numpy_function(self._encode_counted, [e, g, i], tf.int64, stateful=True),
        g,
      ),
      num_parallel_calls=self.num_parallel_calls,
      deterministic=True,
    )
    # sequential, in stream order: the lanes' queues are filled in the order records come
    ds = ds.map(lambda k, g: tf.numpy_function(deal, [k, g], tf.int64, stateful=True))
    ds = ds.filter(lambda k: k >= 0)
    ds = ds.map(
      lambda k: tf.numpy_function(self._collate_group, [k], tf.int64, stateful=True),
      num_parallel_calls=max(1, self.num_parallel_calls // 2),
      deterministic=True,
    )
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = self.num_parallel_calls + 1
    return ds.prefetch(self.prefetch).with_options(options)

  def close(self) -> None:
    """Stops the background work (tf.data threads finish their in-flight records)."""
    self._reset()

  # ------------------------------------------------------------------ iteration
  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = iter(self._dataset())
    try:
      key = next(self._it)
    except StopIteration:
      self._it = None
      raise
    item = self._take(int(key.numpy()))
    if isinstance(item, _Failure):
      self._reset()
      raise item.error
    after, batch = item
    # records the lanes went through for this batch: the used ones and those skipped before them
    consumed = int(((after - self._positions()) // self.global_batch).sum())
    self.seen += consumed
    self.skipped += consumed - self.local_batch
    self._next = after
    if self.process_count == 1:
      self.check_skip_rate(self.seen, self.skipped)
    return batch


@dataclasses.dataclass
class _LaneGroup:
  """The records of one batch, in lane order, and each lane's next stream position after it."""

  after: np.ndarray
  items: list


class _LaneAssembler:
  """The sequential tf.data stage between `encode` and `collate`: takes (parked record or -1,
  stream position) in stream order, queues each good record in its lane, and parks a
  `_LaneGroup` (returning its key, else -1) whenever every local lane has a record queued.

  A lane that meets nothing but unusable records would hold every batch back forever (the skip
  rate is checked when a batch is delivered): after `max(min_checked, 100)` of them in a row it
  stops the run instead."""

  def __init__(self, pipe: PairPipeline, start: np.ndarray):
    self.pipe, self.batch = pipe, pipe.global_batch
    self.lane_of = {int(p) % self.batch: i for i, p in enumerate(start)}
    self.queues: list[collections.deque] = [collections.deque() for _ in range(len(start))]
    self.bad_run = [0] * len(start)  # unusable records in a row, per lane
    self.limit = max(pipe.min_checked, 100)

  def __call__(self, key, position) -> np.int64:
    key, position = int(key), int(position)
    lane = self.lane_of[position % self.batch]
    if key < 0:
      self.bad_run[lane] += 1
      if self.bad_run[lane] >= self.limit:
        stuck = UserError(
          f"{self.bad_run[lane]} records in a row could not be used (slot "
          f"{self.pipe.lanes.start + lane} of every batch reads every {self.batch}th record); "
          "see the warnings above for file:line of each"
        )
        return np.int64(self.pipe._park(_Failure(stuck)))
    else:
      item = self.pipe._take(key)
      if isinstance(item, _Failure):
        return np.int64(self.pipe._park(item))
      self.bad_run[lane] = 0
      self.queues[lane].append((position, item))
    if not all(self.queues):
      return np.int64(-1)
    heads = [q.popleft() for q in self.queues]
    after = np.asarray([p + self.batch for p, _ in heads], np.int64)
    return np.int64(self.pipe._park(_LaneGroup(after, [it for _, it in heads])))


def lanes_state(positions: Mapping[int, int], batch_size: int, n: int, **extra) -> dict:
  """The JSON iterator state of lanes at `positions` (`{lane: stream position of its next
  record}`, see the module docstring); `extra` (counts, seed) is stored alongside."""
  base = min(int(p) - int(j) for j, p in positions.items())
  epoch, position = divmod(base, n)
  ahead = {
    str(j): (int(p) - int(j) - base) // batch_size
    for j, p in sorted(positions.items())
    if int(p) - int(j) != base
  }
  return {
    "epoch": int(epoch),
    "position": int(position),
    "batch_size": int(batch_size),
    "lanes_ahead": ahead,
    **extra,
  }


def state_positions(state: Mapping, batch_size: int, n: int) -> np.ndarray:
  """Stream position of every lane's next record, `[batch_size]`, from an iterator state
  (`lanes_state`'s, or the older single-process `{"epoch", "position"}`)."""
  if int(state.get("process_count", 1)) != 1 and "lanes_ahead" not in state:
    raise UserError(
      "data iterator state was saved per host by an older version "
      f"(process_count={state['process_count']}); it cannot be resumed"
    )
  epoch, position = int(state["epoch"]), int(state["position"])
  if not 0 <= position <= n:
    raise UserError(f"data iterator position {position} is outside the data ({n} records)")
  ahead = {int(j): int(d) for j, d in (state.get("lanes_ahead") or {}).items()}
  saved = int(state.get("batch_size", batch_size))
  if ahead and saved != batch_size:
    raise UserError(
      f"data iterator state was saved with batch size {saved}, this run has {batch_size} (and "
      "some lanes of the saved batches ran ahead): resume with the same train.batch_size / "
      "grad_accum"
    )
  lag = np.asarray([ahead.get(j, 0) for j in range(batch_size)], np.int64)
  return epoch * n + position + np.arange(batch_size, dtype=np.int64) + batch_size * lag


def from_processor(
  entries: Sequence[Entry], processor, *, share_prompt: bool = False, **kwargs
) -> PairPipeline:
  """A PairPipeline using the model's `mrm_jax.models.processor.Processor` for encode/collate
  (`share_prompt`: the shared-prompt layout, one row per pair)."""
  if share_prompt:
    kwargs = dict(
      kwargs, encode_pair_fn=processor.encode_pair, collate_pairs_fn=processor.collate_pairs
    )
  return PairPipeline(
    entries,
    encode_fn=processor.encode,
    collate_fn=processor.collate,
    length_fn=lambda e: e.length,
    patches_fn=lambda e: e.num_patches,
    **dict({"share_vision": True}, **kwargs),
  )
