"""Data for training: the train pipeline built from the config, and exact evaluation batches.

Training uses `mrm_jax.data.pipeline.PairPipeline` (deterministic, resumable). Every process
runs it as if it were the only host and gets the same *global* batch (see loop.py), so its
iterator state is identical everywhere and host-side vision indices stay valid.

Evaluation must see every pair exactly once, so it does not go through the training
pipeline (whose batches are cut to a fixed size): records are encoded in file order, skipped
ones are counted, and the last partial batch is padded by repeating its last pair with
`pair_mask = 0`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from mrm_jax.data import pipeline as pl
from mrm_jax.data.records import normalize_pair, pair_to_scoring, resolve_image
from mrm_jax.errors import UserError
from mrm_jax.models import hf_io
from mrm_jax.models.processor import Processor, pair_share, smart_resize

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
  return Processor.from_pretrained(
    model_path,
    fam,
    mcfg,
    min_pixels=cfg.data.min_pixels,
    max_pixels=cfg.data.max_pixels,
    image_preprocess=cfg.data.get("image_preprocess", None),
    template=cfg.data.get("template", None),
  )


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

  def steps_per_epoch(self, grad_accum: int = 1) -> int:
    return max(1, len(self.entries) // (self.micro_batch * max(1, grad_accum)))

  def get_state(self) -> dict:
    return self.pipeline.get_state()

  def set_state(self, state: dict) -> None:
    self.pipeline.set_state(state)

  def __iter__(self):
    return self.pipeline

  def close(self) -> None:
    self.pipeline.close()


def eval_batches(cfg, processor, spec: str | None = None) -> Iterator[dict]:
  """Every good pair of `data.eval` once, in file order, in batches of `train.batch_size` pairs
  (rounded to the static shapes of `seq_lens` / patch budgets) with a `pair_mask`."""
  entries = _entries(cfg, spec or cfg.data.eval)
  max_len = seq_lens(cfg)[-1]
  bsz = max(1, cfg.train.batch_size // max(1, cfg.train.grad_accum))

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

  items = []
  with ThreadPoolExecutor(max(1, int(cfg.data.num_workers))) as pool:
    for enc in pool.map(encode, entries):
      if enc is None:
        continue
      items.append(enc)
      if len(items) == bsz:
        yield emit(items, bsz)
        items = []
  if items:
    yield emit(items, len(items))


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
  return eval_batches(cfg, processor)


def _image_tokens(path, settings: dict) -> int:
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
      lengths[k] = len(tokens) + sum(_image_tokens(p, processor.image_settings) for p in paths)
    except (OSError, ValueError, UserError):
      lengths[k] = len(tokens)
  return lengths
