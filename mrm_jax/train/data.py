"""Data for training: the train pipeline built from the config, and exact evaluation batches.

Training uses `mrm_jax.data.pipeline.PairPipeline` (deterministic, resumable). With several
processes each one encodes only its block of every global batch (its devices' pairs, the
pipeline's lanes; `mrm_jax.train.sharding.process_block` says which), and the loop joins the
blocks on the devices (`sharding.join_blocks`). Blocks must have equal shapes, but each process
picks its sequence bucket and patch budget from its own pairs: once per step the processes
exchange their batch arrays' shapes (one small allgather on the main thread, `agree`) and pad to
the largest (zeros are padding for every array, see `pad_to_common_shape`), then shift their
host-computed indices to where their block lands (`sharding.offset_block`). The same exchange
carries each process's skip counts (the skip rate is checked over all processes) and a failure
flag, so an error in one process's input stops every process instead of leaving the others
waiting in a collective. The iterator state is global (every lane's position), so a run
resumes on any number of processes.

Evaluation must see every pair exactly once, so it does not go through the training pipeline
(whose batches are cut to a fixed size): batch k holds the records [kB, (k+1)B) of the file,
each process encodes its block of them, and records that cannot be used, like the slots past
the file's end, become padding pairs with `pair_mask = 0` (a usable pair of the block repeated,
or the file's first when the block has none).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from mrm_jax import distributed
from mrm_jax.data import pipeline as pl
from mrm_jax.data.records import normalize_pair, pair_to_scoring, resolve_image
from mrm_jax.errors import UserError
from mrm_jax.models import hf_io
from mrm_jax.models.processor import Processor, pair_share, smart_resize
from mrm_jax.train import sharding as shd

log = logging.getLogger(__name__)


def data_files(spec: str) -> list[str]:
  return [s.strip() for s in str(spec or "").split(",") if s.strip()]


def make_processor(cfg, model_path: str | None):
  """The model's processor (tokenizer + chat template + image settings) from its HF directory."""
  if not model_path:
    raise UserError(
      "training data needs the model's tokenizer: set model.path (or --init_from) to an HF "
      "directory holding config.json and the tokenizer files"
    )
  fam, mcfg = hf_io.family_and_config(model_path)
  proc = Processor.from_pretrained(
    model_path,
    fam,
    mcfg,
    min_pixels=cfg.data.min_pixels,
    max_pixels=cfg.data.max_pixels,
    image_preprocess=cfg.data.get("image_preprocess", None),
    template=cfg.data.get("template", None),
  )
  proc.pixel_dtype = np.dtype(ml_dtypes.bfloat16 if cfg.model.dtype == "bfloat16" else np.float32)
  return proc


def _entries(cfg, spec: str):
  files = data_files(spec)
  if not files:
    raise UserError("no training data: set data.train (pair file(s), comma-separated)")
  entries = []
  for f in files:
    if f.startswith("tfds:"):
      raise UserError(
        f"{f}: TFDS datasets are read through `mrm-jax convert` first; give the pair file here"
      )
    entries += pl.load_entries(f, cfg.data.image_root or None)
  return entries


def seq_lens(cfg) -> tuple[int, ...]:
  return tuple(cfg.data.seq_buckets) or (int(cfg.data.max_seq_len),)


def patch_budgets(cfg):
  return (int(cfg.data.patch_budget),) if cfg.data.patch_budget else None


class TrainData:
  """The train pipeline plus what the loop needs to know about it."""

  def __init__(self, cfg, processor):
    self.entries = _entries(cfg, cfg.data.train)
    micro = cfg.train.batch_size // max(1, cfg.train.grad_accum)
    self.micro_batch = micro
    self.patch_unit = int(processor.config.merge_size) ** 2
    group = int(cfg.data.get("length_group", 0))
    lengths = None
    if group > 1:
      lengths = estimate_lengths(
        self.entries, processor, packed=bool(cfg.data.get("share_prompt", False))
      )
      log.info(
        "length-grouped batches: %d pairs, groups of %d batches, estimated tokens %d..%d",
        len(lengths),
        group,
        int(lengths.min()),
        int(lengths.max()),
      )
    self.pipeline = pl.PairPipeline(
      self.entries,
      encode_fn=processor.encode,
      collate_fn=processor.collate,
      length_fn=lambda e: e.length,
      patches_fn=lambda e: e.num_patches,
      batch_size=micro,
      seq_lens=seq_lens(cfg),
      patch_budgets=patch_budgets(cfg),
      seed=int(cfg.seed),
      shuffle=bool(cfg.data.shuffle),
      num_epochs=None,
      process_index=0,
      process_count=1,
      max_skip_rate=cfg.data.max_skip_rate,
      num_parallel_calls=cfg.data.num_workers,
      lengths=lengths,
      group_batches=group,
      share_vision=True,
      **(
        dict(encode_pair_fn=processor.encode_pair, collate_pairs_fn=processor.collate_pairs)
        if cfg.data.get("share_prompt", False)
        else {}
      ),
    )

  # this process's block of the global batch, and the records read before a restore (several
  # blocks: the pipeline counts only its own since then)
  block = (0, 1)
  _restored = (0, 0)

  def steps_per_epoch(self, grad_accum: int = 1) -> int:
    return max(1, len(self.entries) // (self.micro_batch * max(1, grad_accum)))

  def set_block(self, index: int, count: int) -> None:
    """From now on this process encodes only block `index` of `count` of every global batch
    (call it before `set_state`)."""
    if self.micro_batch % count:
      raise UserError(
        f"a micro-batch of {self.micro_batch} pairs cannot be split into {count} equal blocks "
        "(one per process, or group of processes, along the mesh's batch axes)"
      )
    self.block = (int(index), int(count))
    self.pipeline.set_process(*self.block)

  def get_state(self) -> dict:
    """The global iterator state (the same on every process; with several blocks every process
    must call it: the lanes' positions are gathered)."""
    index, count = self.block
    if count == 1:
      return self.pipeline.get_state()
    p = self.pipeline
    mine = np.asarray([index, p.seen, p.skipped, *p.lane_positions().values()], np.int64)
    positions, seen, skipped = {}, *self._restored
    for row in _unique_blocks(multihost_utils.process_allgather(mine)):
      b = int(row[0])
      seen, skipped = seen + int(row[1]), skipped + int(row[2])
      positions.update({b * p.local_batch + t: int(q) for t, q in enumerate(row[3:])})
    return pl.lanes_state(
      positions, self.micro_batch, len(self.entries), seen=seen, skipped=skipped, seed=p.seed
    )

  def set_state(self, state: dict) -> None:
    self.pipeline.set_state(state)
    if self.block[1] > 1:
      self._restored = (int(state.get("seen", 0)), int(state.get("skipped", 0)))

  def assemble_step(
    self,
    parts: list[dict],
    error: BaseException | None = None,
    measure: Callable[[dict], tuple[int, int]] | None = None,
  ) -> tuple[dict, tuple[int, int]]:
    """This process's micro-batches of one step → (its block of the step batch, stacked on a
    leading micro-batch axis; `measure(micro-batch)` (two numbers, e.g. tokens and vision
    patches) summed over every micro-batch of every block). `error`: this process's input
    failed; every process raises (see the module docstring)."""

    def total(batches):
      got = [measure(b) for b in batches] if measure else []
      return tuple(int(sum(v)) for v in zip(*got)) if got else (0, 0)

    index, count = self.block
    if count == 1:
      if error is not None:
        raise error
      return stack_micro(parts), total(parts)
    p = self.pipeline
    mine = (0, 0) if error is not None else total(parts)
    parts, rows = agree(parts, error, [index, p.seen, p.skipped, *mine])
    rows = _unique_blocks(rows)
    p.check_skip_rate(
      self._restored[0] + int(rows[:, 1].sum()), self._restored[1] + int(rows[:, 2].sum())
    )
    host = stack_micro([shd.offset_block(b, index, self.patch_unit) for b in parts])
    return host, (int(rows[:, 3].sum()), int(rows[:, 4].sum()))

  def __iter__(self):
    return self.pipeline

  def close(self) -> None:
    self.pipeline.close()


def eval_batches(
  cfg, processor, spec: str | None = None, block: tuple[int, int] = (0, 1)
) -> Iterator[dict]:
  """Every good pair of `data.eval` once, in file order, in batches of `train.batch_size` pairs
  (rounded to the static shapes of `seq_lens` / patch budgets) with a `pair_mask`; with
  `block = (index, count)`, this process's block of each (see the module docstring)."""
  entries = _entries(cfg, spec or cfg.data.eval)
  max_len = seq_lens(cfg)[-1]
  total = max(1, cfg.train.batch_size // max(1, cfg.train.grad_accum))
  index, count = block
  if total % count:
    raise UserError(f"an eval batch of {total} pairs cannot be split into {count} equal blocks")
  bsz = total // count

  share_prompt = bool(cfg.data.get("share_prompt", False))

  def encode(entry):
    try:
      pair, _ = pl.check_pair(entry)
      c, r = pair_to_scoring(pair)
      strength = float(pair.get("strength") or 0.0)
      if share_prompt:
        return processor.encode_pair(c, r, entry.image_root, max_len, entry.where), strength
      chosen = processor.encode(c, entry.image_root, max_len, entry.where)
      # the pair's images once: the rejected response reuses the chosen one's processed images
      rejected = processor.encode(r, entry.image_root, max_len, entry.where, vision=chosen)
      return (chosen, rejected), strength
    except pl.BAD_INPUT_ERRORS as e:
      log.warning(
        "eval: skipping record %s", e if isinstance(e, UserError) else f"{entry.where}: {e}"
      )
      return None

  def budget(need: int) -> int:
    budgets = patch_budgets(cfg)
    return pl._pick(budgets, need, "vision patches") if budgets else pl._next_pow2(need)

  def emit(items, real):
    while len(items) < bsz:
      items.append(items[-1])
    if share_prompt:
      pairs = [it[0] for it in items]
      row_len = pl._pick(pl.row_buckets(seq_lens(cfg)), max(e.length for e in pairs), "tokens")
      sub_len = pl._pick(seq_lens(cfg), max(e.sub_length for e in pairs), "tokens")
      own = pl.own_buckets(seq_lens(cfg))
      own_len = pl._pick(own, max(e.own_length for e in pairs), "tokens")
      need = sum(e.num_patches for e in pairs)
      batch = dict(processor.collate_pairs(pairs, row_len, sub_len, own_len, budget(need)))
    else:
      examples = [it[0][0] for it in items] + [it[0][1] for it in items]
      seq_len = pl._pick(seq_lens(cfg), max(e.length for e in examples), "tokens")
      need = sum(e.num_patches for e in examples[:bsz])  # rejected rows share the chosen's images
      share = pair_share(len(examples))
      batch = dict(processor.collate(examples, seq_len, budget(need), share=share))
    batch["strength"] = np.asarray([it[1] for it in items], np.float32)
    batch["pair_mask"] = (np.arange(bsz) < real).astype(np.float32)
    return batch

  def filler():
    """A usable pair of the file (its first) to pad a block that has none; None if none is."""
    return next((enc for enc in map(encode, entries) if enc is not None), None)

  starts = [k * total + index * bsz for k in range(math.ceil(len(entries) / total))]
  slots = [range(s, min(s + bsz, len(entries))) for s in starts]
  spare = None
  with ThreadPoolExecutor(max(1, int(cfg.data.num_workers))) as pool:
    # the next batch's records are encoded while this one is collated and evaluated
    ahead = [pool.submit(encode, entries[i]) for i in slots[0]]
    for k in range(len(slots)):
      batch, error = None, None
      try:
        good = [e for e in (f.result() for f in ahead) if e is not None]
        if k + 1 < len(slots):
          ahead = [pool.submit(encode, entries[i]) for i in slots[k + 1]]
        spare = spare or (good[0] if good else filler())
        if spare is None:
          return  # no usable pair in the whole file, on every process alike
        batch = emit(good or [spare], len(good))
      except Exception as e:  # noqa: BLE001 - every process must hear of it (see agree)
        if count == 1:
          raise
        error = e
      if count > 1:
        (batch,), _ = agree([batch] if batch is not None else None, error)
        batch = shd.offset_block(batch, index, int(processor.config.merge_size) ** 2)
      yield batch


class EvalData:
  """`eval_batches` of a config as an iterable that the loop can point at its block."""

  def __init__(self, cfg, processor):
    self.cfg, self.processor, self.block = cfg, processor, (0, 1)

  def set_block(self, index: int, count: int) -> None:
    self.block = (int(index), int(count))

  def __iter__(self):
    return eval_batches(self.cfg, self.processor, block=self.block)


# -- processes agreeing on one batch shape ---------------------------------------------------------

_MAX_DIMS = 256  # the dimensions of every array of a batch, in one fixed-size message


def _unique_blocks(rows: np.ndarray) -> np.ndarray:
  """The gathered rows of one process per block (column 0: the block; processes feeding the same
  block send the same numbers, which must count once)."""
  _, first = np.unique(rows[:, 0], return_index=True)
  return rows[np.sort(first)]


def _signature(batch: dict) -> int:
  text = ";".join(f"{k}:{np.ndim(v)}:{np.asarray(v).dtype}" for k, v in sorted(batch.items()))
  return zlib.crc32(text.encode())


def agree(
  batches: list[dict] | None, error: BaseException | None, numbers: Sequence[int] = ()
) -> tuple[list[dict], np.ndarray]:
  """Pads this process's `batches` (micro-batches of one step, or one eval batch) to the shapes
  common to every process's (the largest of each dimension) and returns them with every
  process's `numbers` (as many on every process, failed or not), gathered `[processes, n]`. One
  allgather on the calling (main) thread. If any process failed (`error`, or no `batches`) every
  process raises: the failed one its own error, the others a UserError naming it."""
  dims: list[int] = []
  signature = 0
  if error is None and batches:
    signature = _signature(batches[0])
    if any(_signature(b) != signature for b in batches):
      error = RuntimeError("the micro-batches of one step hold different batch arrays")
    else:
      for k in sorted(batches[0]):
        dims += [max(np.shape(b[k])[i] for b in batches) for i in range(np.ndim(batches[0][k]))]
      if len(dims) > _MAX_DIMS:
        error = RuntimeError(f"a batch with {len(dims)} dimensions: raise _MAX_DIMS")
  failed = error is not None or not batches
  if failed:
    dims = []
  head = 1 + len(numbers)
  mine = np.zeros(head + _MAX_DIMS, np.int64)
  mine[:head] = [signature, *numbers]
  mine[head : head + len(dims)] = dims
  rows = distributed.allgather_or_stop(
    mine,
    failed,
    error,
    "the input of process(es) {processes} failed (see their logs); stopping process "
    f"{jax.process_index()} too",
  )
  if len(set(rows[:, 0].tolist())) != 1:
    raise RuntimeError("processes collated different batch arrays (keys, ranks or dtypes)")
  target = rows[:, head:].max(axis=0)
  out, at = [dict(b) for b in batches], 0
  for k in sorted(batches[0]):
    ndim = np.ndim(batches[0][k])
    shape = tuple(int(s) for s in target[at : at + ndim])
    at += ndim
    for b in out:
      a = np.asarray(b[k])
      if a.shape != shape:
        b[k] = np.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])
  return out, rows[:, 1:head]


def stack_micro(batches: list[dict]) -> dict:
  """Micro-batches stacked on a new leading axis (padded to one shape first); one micro-batch
  gets the axis as a view (no copy of the pixels)."""
  if len(batches) == 1:
    return {k: np.asarray(v)[None] for k, v in batches[0].items()}
  batches = pad_to_common_shape(batches)
  return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def pad_to_common_shape(batches: list[dict]) -> list[dict]:
  """Micro-batches of one step may have different static shapes (sequence bucket, patch budget);
  stacking needs one. Padding is zeros: attention_mask 0 and vision segment 0 mean "padding"."""
  keys = batches[0].keys()
  out = [dict(b) for b in batches]
  for k in keys:
    shapes = [np.shape(b[k]) for b in batches]
    if len(set(shapes)) == 1:
      continue
    target = tuple(max(s[i] for s in shapes) for i in range(len(shapes[0])))
    for b in out:
      a = np.asarray(b[k])
      b[k] = np.pad(a, [(0, t - s) for s, t in zip(a.shape, target)])
  return out


def default_data_factory(cfg, split: str, model_path: str | None):
  processor = make_processor(cfg, model_path)
  if split == "train":
    return TrainData(cfg, processor)
  return EvalData(cfg, processor)


def image_tokens(path, settings: dict) -> int:
  """Vision tokens of an image from its header's size, as the processor will resize it."""
  with Image.open(path) as im:  # reads the header only
    width, height = im.size
  patch, merge = int(settings["patch_size"]), int(settings["merge_size"])
  h, w = smart_resize(
    height,
    width,
    factor=patch * merge,
    min_pixels=int(settings["min_pixels"]),
    max_pixels=int(settings["max_pixels"]),
  )
  return (h // patch) * (w // patch) // merge**2


def estimate_lengths(entries, processor, packed: bool = False) -> np.ndarray:
  """Tokens of each pair's longer row (`packed`: of its shared-prompt row, the prompt once and
  both answers), as the processor will encode it up to the chat template's few constant tokens:
  text tokens plus each image's tokens from its header's size. Records that cannot be read get 0
  (the pipeline skips them when it reaches them)."""
  texts, images, where = [], [], []
  for k, entry in enumerate(entries):
    try:
      pair = normalize_pair(entry.record, entry.where)
      paths = [resolve_image(p, entry.image_root, entry.where) for p in pair.get("images") or []]
    except (UserError, TypeError, AttributeError):
      continue
    answers = (
      pair["chosen"] + pair["rejected"]
      if packed
      else max(pair["chosen"], pair["rejected"], key=len)
    )
    texts.append((pair.get("system") or "") + pair["question"] + answers)
    images.append(paths)
    where.append(k)
  lengths = np.zeros(len(entries), np.int64)
  if not texts:
    return lengths
  ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
  for k, tokens, paths in zip(where, ids, images):
    try:
      lengths[k] = len(tokens) + sum(image_tokens(p, processor.image_settings) for p in paths)
    except (OSError, ValueError, UserError):
      lengths[k] = len(tokens)
  return lengths
