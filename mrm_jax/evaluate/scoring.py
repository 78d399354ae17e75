"""Batched, sharded scoring of records with a reward model (library; `mrm-jax score`, evaluation and
curation call it).

Records are deduplicated (identical images / videos / system / question / answer are encoded and
scored once), sorted by their estimated length (text tokens plus each image's tokens from its
header, `estimate_records`: known before any image is decoded) so each batch pads little, encoded
on the host, and padded to a few static shapes (sequence length and patch budget rounded up to
buckets, so jit compiles a handful of programs). A step's global batch is split into one sub-batch
per data shard of the mesh; each sub-batch is collated on its own (its own vision patches and
host-computed indices), the stack of them is laid out one sub-batch per device, and a jitted
`vmap` of the model runs them, so every device encodes its own images and texts: the vision tower
is data-parallel too, not replicated. Parameters are replicated (or sharded by
`mrm_jax.train.sharding`'s rules on a mesh with fsdp / tensor axes); rewards come back fully
replicated, so every process holds every score.

Multi-host: with `devices=jax.devices()` (what `mrm-jax score` passes) every process must call
with the same records. Each computes the same order (from the estimates) but encodes and collates
only the records of its own devices' sub-batches; once per step the processes exchange what their
sub-batches need (longest row, patches, attention layout sizes; one small allgather on the main
thread) and pad to the common shapes, so every device computes what it would in one process and
the scores are identical at any process count. The same exchange carries a failure flag: a record
that cannot be encoded stops every process, not only the one that read it. The default is this
process's local devices, so callers that hand each process different records (curation) stay
independent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from mrm_jax import distributed
from mrm_jax.data.records import normalize_scoring, resolve_image
from mrm_jax.errors import UserError
from mrm_jax.io import iter_jsonl
from mrm_jax.models import vision_layout
from mrm_jax.models.processor import Encoded
from mrm_jax.train import sharding as shd
from mrm_jax.train.data import image_tokens

log = logging.getLogger(__name__)


def _bucket(n: int, base: int) -> int:
  """Rounds up to base * 2^k (≤ 2x waste), so a whole run needs only a few static shapes."""
  size = base
  while size < n:
    size *= 2
  return size


def scoring_key(record: dict) -> str:
  """What the processor reads of a scoring record (images, videos, system, question, answer),
  hashed: records with equal keys encode identically, so they are scored once. (`score_key` of
  mrm_jax.data.records is coarser on purpose: it drops the `<image>` markers and the system
  prompt, which change the encoding.)"""
  images = record.get("images") or []
  if isinstance(images, str):
    images = [images]
  payload = [
    list(images),
    record.get("videos") or [],
    record.get("system"),
    record.get("question"),
    record.get("answer"),
  ]
  return hashlib.sha1(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def scoring_mesh(mesh=None, devices=None):
  """The mesh scoring runs on: `mesh` as given, else a data-parallel mesh over `devices` (default:
  this process's local devices)."""
  if mesh is not None:
    return mesh

  return shd.make_mesh({"data": -1}, jax.local_devices() if devices is None else devices)


def step_rows(batch_size: int, mesh) -> tuple[int, int]:
  """(rows per step, rows per data shard): `batch_size` rounded up to a multiple of the mesh's
  data shards (data x fsdp); the padding rows are empty and their scores discarded."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  per = -(-batch_size // shards)
  return per * shards, per


def score_records(
  model,
  processor,
  records: Sequence[dict],
  image_root,
  batch_size: int = 8,
  *,
  max_len: int = 4096,
  where: Callable[[int], str] | None = None,
  seq_bucket: int = 64,
  patch_bucket: int = 256,
  chunk: int | None = None,
  progress: bool = True,
  mesh=None,
  devices=None,
) -> list[float]:
  """Rewards (floats, input order) for scoring records (`images`, `question`, `answer`, `system`?).

  `where(i)` names record i in error messages (default "record i+1"). `batch_size` is the global
  batch per step, rounded up to a multiple of the mesh's data shards. `mesh` / `devices`: see
  `scoring_mesh`. Records are processed in chunks of `chunk` (default 32 steps) so host memory
  stays bounded on large files.
  """
  scores: list[float] = []
  for _, got in iter_score_chunks(
    model,
    processor,
    records,
    image_root,
    batch_size,
    max_len=max_len,
    where=where,
    seq_bucket=seq_bucket,
    patch_bucket=patch_bucket,
    chunk=chunk,
    progress=progress,
    mesh=mesh,
    devices=devices,
  ):
    scores.extend(got)
  return scores


def iter_score_chunks(
  model,
  processor,
  records: Sequence[dict],
  image_root,
  batch_size: int = 8,
  *,
  start: int = 0,
  known: dict[str, float] | None = None,
  max_len: int = 4096,
  where: Callable[[int], str] | None = None,
  seq_bucket: int = 64,
  patch_bucket: int = 256,
  chunk: int | None = None,
  progress: bool = True,
  mesh=None,
  devices=None,
) -> Iterator[tuple[int, list[float]]]:
  """Yields `(first index, scores)` for consecutive chunks of `records[start:]`, in input order.

  Chunk boundaries lie on the fixed grid `start + k * chunk`, and `known` (scoring_key → score,
  updated in place) holds scores of earlier records, so a run resumed at a chunk boundary with the
  scores logged so far computes exactly what the uninterrupted run computed.
  """

  where = where or (lambda i: f"record {i + 1}")
  mesh = scoring_mesh(mesh, devices)
  rows, per_shard = step_rows(batch_size, mesh)
  chunk = chunk or 32 * rows
  known = {} if known is None else known
  runner = _Runner(model, mesh) if start < len(records) else None
  bar = tqdm(
    total=max(0, len(records) - start),
    desc="scoring",
    unit="rec",
    disable=not progress or jax.process_index() != 0,
  )
  done = 0  # records this process encoded
  for c0 in range(start, len(records), chunk):
    idx = range(c0, min(c0 + chunk, len(records)))
    keys = [scoring_key(records[i]) for i in idx]
    todo: dict[str, int] = {}  # key → first index, in input order
    for i, k in zip(idx, keys):
      if k not in known and k not in todo:
        todo[k] = i
    mult = Counter(keys)
    estimates = estimate_records(processor, [records[i] for i in todo.values()], image_root)
    size = dict(zip(todo, estimates))
    order = sorted(todo, key=size.__getitem__)  # stable: ties in input order
    steps = [order[s0 : s0 + rows] for s0 in range(0, len(order), rows)]
    # the records of this process's sub-batches, encoded in input order
    mine = {k for step in steps for j in runner.local for k in step[j * per_shard :][:per_shard]}
    encoded, error = {}, None
    try:
      for k, i in todo.items():
        if k in mine:
          encoded[k] = processor.encode(records[i], image_root, max_len, where(i))
          done += 1
    except Exception as e:  # noqa: BLE001 - the other processes must hear of it first
      if not runner.shared:
        raise
      error = e
    shown = 0
    for step in steps:
      rewards = runner(processor, step, encoded, per_shard, seq_bucket, patch_bucket, error)
      for k, r in zip(step, rewards):
        known[k] = float(r)
      n = sum(mult[k] for k in step)
      bar.update(n)
      shown += n
    bar.update(len(idx) - shown)  # records whose score was already known
    encoded.clear()  # host memory: one chunk at a time
    yield c0, [known[k] for k in keys]
  bar.close()
  log.info("input: process %d encoded %d records", jax.process_index(), done)


def estimate_records(processor, records: Sequence[dict], image_root) -> list[tuple[int, int]]:
  """(tokens, vision tokens) each scoring record will encode to, up to the chat template's few
  constant tokens: its text's tokens plus each image's (video frame's) from its header. An image
  that cannot be read counts 0 (`encode` names the record when it reaches it). Every process
  computes the same, so it orders the records before any image is decoded."""
  if not records:
    return []
  texts = ["".join(str(r.get(k) or "") for k in ("system", "question", "answer")) for r in records]
  ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
  video_tp = int(processor.video_settings.get("temporal_patch_size", 1) or 1)

  def tokens(path, settings) -> int:
    try:
      return image_tokens(resolve_image(path, image_root), settings)
    except (OSError, ValueError, UserError):
      return 0

  out = []
  for record, text in zip(records, ids):
    images = record.get("images") or []
    vision = sum(
      tokens(p, processor.image_settings) for p in ([images] if isinstance(images, str) else images)
    )
    for frames in record.get("videos") or []:
      if frames:
        per = tokens(frames[0], processor.video_settings)
        vision += per * -(-len(frames) // video_tp)
    out.append((len(text) + vision, vision))
  return out


class _Runner:
  """Parameters placed on the mesh and the jitted, vmapped forward over per-shard sub-batches."""

  def __init__(self, model, mesh):

    self.mesh = mesh
    self.shards = mesh.shape["data"] * mesh.shape["fsdp"]
    graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, shd.state_shardings(state, mesh))
    self.forward = _jitted_forward(graphdef, mesh)
    # sub-batch j lives on the devices of data shard j (repeated over the tensor axis)
    self.sharding = NamedSharding(mesh, shd.batch_spec((self.shards,), mesh))
    index_map = self.sharding.addressable_devices_indices_map((self.shards,))
    self.local = sorted({j for idx in index_map.values() for j in range(self.shards)[idx[0]]})
    # other processes feed some of the sub-batches: shapes (and failures) are agreed each step
    self.shared = len(self.local) < self.shards

  def __call__(
    self,
    processor,
    step: list,
    encoded: dict,
    per_shard: int,
    seq_bucket: int,
    patch_bucket: int,
    error: BaseException | None = None,
  ) -> np.ndarray:
    """Rewards of the records `step` (keys of `encoded`, which holds at least this process's
    sub-batches' records); `error`: this process failed to encode them."""
    unit = processor.config.merge_size**2
    if error is None:
      subs = {j: [encoded[k] for k in step[j * per_shard :][:per_shard]] for j in self.local}
    needs = _needs(subs.values()) if error is None else (0, 0, {})
    if self.shared:
      needs = _agree_needs(*needs, error)
    elif error is not None:
      raise error
    longest, most, layout = needs
    seq = _bucket(longest, seq_bucket)
    budget = 0 if most == 0 else _bucket(most, max(patch_bucket, unit) // unit * unit)
    # rows padded to per_shard (empty rows) so every sub-batch has the same static shape
    filler = _empty_like(processor)
    host = {
      j: processor.collate(
        subs[j] + [filler] * (per_shard - len(subs[j])),
        seq_len=seq,
        patch_budget=budget,
        layout_sizes=layout,
      )
      for j in self.local
    }
    names = sorted({k for h in host.values() for k in h})
    batch = {}
    for name in names:
      ref = next(h[name] for h in host.values() if name in h)

      def part(index, name=name, ref=ref):
        return np.stack(
          [host[j].get(name, np.zeros_like(ref)) for j in range(self.shards)[index[0]]]
        )

      batch[name] = jax.make_array_from_callback((self.shards,) + ref.shape, self.sharding, part)
    rewards = np.asarray(jax.device_get(self.forward(self.state, batch)))
    return rewards.reshape(-1)[: len(step)]


def _needs(subs) -> tuple[int, int, dict]:
  """(longest row, most patches of a sub-batch, per-item attention layout needs) of sub-batches."""
  subs = list(subs)
  longest = max((e.length for sb in subs for e in sb), default=1)
  most = max((sum(e.num_patches for e in sb) for sb in subs), default=0)
  # one per-item attention layout shape for every sub-batch (they are stacked)
  layout = vision_layout.common_sizes(vision_layout.batch_needs(sb) for sb in subs)
  return longest, most, layout


_LAYOUT_NAMES = tuple(sorted(vision_layout.LAYOUTS))


def _agree_needs(longest: int, most: int, layout: dict, error) -> tuple[int, int, dict]:
  """The step's needs over every process's sub-batches (each process knows only its own): one
  allgather; a process that failed to encode makes every process raise."""
  mine = [longest, most]
  for name in _LAYOUT_NAMES:
    rows, width = layout.get(name, (0, 0))
    mine += [int(name in layout), rows, width]
  got = distributed.allgather_or_stop(
    mine,
    error is not None,
    error,
    "scoring stopped: process(es) {processes} could not encode their records (see their logs)",
  )
  top = got.max(axis=0)
  layout = {
    name: (int(top[3 + 3 * n]), int(top[4 + 3 * n]))
    for n, name in enumerate(_LAYOUT_NAMES)
    if top[2 + 3 * n]
  }
  return int(top[0]), int(top[1]), layout


def _empty_like(processor):
  """A one-token filler row (no vision) used to pad a batch to its static size."""
  dim = processor.config.vision.patch_dim
  none = np.zeros((0, 3), np.int32)
  return Encoded(
    np.asarray([processor.pad_id], np.int32),
    np.zeros((3, 1), np.int32),
    np.zeros((0, dim), np.float32),
    none,
    processor.family.vision_patch_arrays(none, processor.config),
  )


_FORWARDS: dict = {}


def _jitted_forward(graphdef, mesh):
  """`(state, batch [shards, rows, ...]) -> rewards [shards, rows]`, replicated on every device;
  one jitted function per model structure and mesh, so repeated calls reuse compiled programs."""
  key = (graphdef, mesh)
  if key not in _FORWARDS:

    def forward(state, batch):
      model = nnx.merge(graphdef, state)
      return jax.vmap(lambda sub: model(sub))(batch)

    _FORWARDS[key] = jax.jit(forward, out_shardings=NamedSharding(mesh, PartitionSpec()))
  return _FORWARDS[key]


def score_file_records(
  model,
  processor,
  path,
  image_root=None,
  batch_size: int = 8,
  max_len: int = 4096,
  progress: bool = True,
  **kwargs,
) -> tuple[list[dict], list[float]]:
  """Reads a scoring JSONL file (records validated, errors name file:line) and scores it; returns
  the
  records as read (unmodified) and their scores. `kwargs` go to `score_records` (mesh, devices,
  ...)."""

  path = Path(path)
  raw, records, lines = read_scoring_file(path)
  root = Path(image_root) if image_root else path.parent
  scores = score_records(
    model,
    processor,
    records,
    root,
    batch_size,
    max_len=max_len,
    where=lambda i: f"{path}:{lines[i]}",
    progress=progress,
    **kwargs,
  )
  return raw, scores


def read_scoring_file(path) -> tuple[list[dict], list[dict], list[int]]:
  """(records as read, normalised scoring records, line numbers) of a scoring JSONL file."""

  path = Path(path)
  raw, records, lines = [], [], []
  for lineno, rec in iter_jsonl(path):
    records.append(normalize_scoring(rec, f"{path}:{lineno}"))
    raw.append(rec)
    lines.append(lineno)
  return raw, records, lines
