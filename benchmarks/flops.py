"""Executed FLOPs per pair of the jitted train step and of scoring, as XLA counts them in the
lowered program (`Lowered.cost_analysis()`), against the analytic useful minimum. One JSON line
per workload (and ordering); no parameter is allocated: the state and the batch are
`jax.ShapeDtypeStruct`s.

  python benchmarks/flops.py --workload bench          # shared/bench: 8 pairs x 1,024 tokens
  python benchmarks/flops.py --workload dt2it          # DT2IT-like lengths, buckets 512/1024/2048
  python benchmarks/flops.py --workload bench --legacy # the layout before issue 17 (for comparison)
  python benchmarks/flops.py --workload dt2it --layout shared_prompt   # one row per pair (issue 20)

Both workloads use the Qwen2-VL-2B shape, vision frozen, bf16, one 448x448 image (1,024 patches,
256 merged tokens) per pair. `--legacy` collates each row's image separately and attends over the
whole patch sequence under a block-diagonal mask (what the model did before per-item attention).

Useful minimum: 6·N_lm per real LM token (forward + backward) plus causal attention (QKᵀ and PV
over the lower triangle, ×3), and for each pair's image once 2·N_vis per patch plus its
attention (frozen tower: forward only); scoring: 2·N_lm per real token, half of the causal
attention ×1, and each sequence's image.

dt2it: `--pairs` pairs seeded from `--seed`: prompt 300-1,300 tokens including the image, chosen
and rejected responses 100-400 tokens each; batches of 8 pairs in the pipeline's two orders (the
seeded shuffle, and length-grouped batches of mrm_jax.data.ordering with `--group` batches per
group), each padded to the smallest bucket its longest row fits. `padding_ratio` = executed FLOPs
over the FLOPs of the same step on the same pairs without padding, estimated as executed /
useful of the unpadded-bench-shaped step (the bench ratio) applied per batch.

`--layout shared_prompt` (dt2it): each pair in one row [prompt, chosen, rejected]
(mrm_jax/models/pair_layout.py), rows padded to a bucket of `row_buckets(--buckets)` and both
sequences to a bucket of `--buckets`, batches length-grouped by the packed length; the prompt-once
minimum counts the prompt's tokens once and each response's causal attention over the prompt and
itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as bench  # noqa: E402  (the synthetic bench-shaped examples)

from mrm_jax.config import base_config  # noqa: E402
from mrm_jax.data.ordering import epoch_order  # noqa: E402
from mrm_jax.data.pipeline import own_buckets, row_buckets  # noqa: E402
from mrm_jax.evaluate.scoring import _jitted_forward  # noqa: E402
from mrm_jax.models import get_family, pair_layout, vision_layout  # noqa: E402
from mrm_jax.models.processor import Encoded, collate, pair_share  # noqa: E402
from mrm_jax.train import sharding as shd  # noqa: E402
from mrm_jax.train.loop import Setup, _model_flops_spec, _stack_micro  # noqa: E402

BUCKETS = (512, 1024, 2048)
PAIRS_PER_STEP = 8
IMAGE = 448


def _setup(preset: str = "qwen2-vl-2b") -> Setup:
  cfg = base_config()
  cfg.model.family, cfg.model.preset, cfg.model.dtype = "qwen2_vl", preset, "bfloat16"
  cfg.model.attention = "xla"  # what XLA counts does not depend on the kernel; cuDNN needs a GPU
  cfg.train.batch_size, cfg.train.learning_rate = PAIRS_PER_STEP, 1e-5
  return Setup(cfg, num_steps=10)


def _abstract(tree, shardings=None):
  if shardings is None:

    def one(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        return x
      return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)

    return jax.tree.map(one, tree)
  return {
    k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=shardings[k])
    for k, v in tree.items()
  }


def pair_batch(mcfg, pairs: int, seq_len: int, mode: str = "pairs") -> dict:
  """A collated batch of `pairs` pairs, every row `seq_len` tokens with one 448² image. `mode`:
  "pairs" (each pair's image once: the train step), "rows" (an image per row: scoring), "legacy"
  (an image per row under one block-diagonal mask: before issue 17)."""
  n_img = (IMAGE // mcfg.vision.patch_size) ** 2 // mcfg.merge_size**2
  examples, _ = bench.synthetic_examples(
    mcfg, get_family("qwen2_vl"), 2 * pairs, seq_len - n_img, IMAGE
  )
  if mode == "rows":
    return collate(examples, seq_len, merge_size=mcfg.merge_size, patch_dim=mcfg.vision.patch_dim)
  if mode == "legacy":
    batch = collate(
      examples,
      seq_len,
      merge_size=mcfg.merge_size,
      patch_dim=mcfg.vision.patch_dim,
      strength=np.zeros(pairs, np.float32),
    )
    return {
      k: v
      for k, v in batch.items()
      if not (k.startswith("vision_items") or k == "vision_token_offset")
    }
  for r, c in zip(examples[pairs:], examples[:pairs]):  # a pair's rows share its image
    r.pixel_values, r.grid_thw, r.patch_arrays = c.pixel_values, c.grid_thw, c.patch_arrays
  return collate(
    examples,
    seq_len,
    merge_size=mcfg.merge_size,
    patch_dim=mcfg.vision.patch_dim,
    strength=np.zeros(pairs, np.float32),
    share=pair_share(2 * pairs),
  )


def shared_prompt_batch(mcfg, pairs: int, row_len: int, sub_len: int, own_len: int) -> dict:
  """A shared-prompt batch of `pairs` rows of `row_len` tokens whose sequences fit `sub_len` and
  rejected responses `own_len` (XLA's count depends on the shapes only), one 448² image in each
  prompt."""
  fam = get_family("qwen2_vl")
  n_img = (IMAGE // mcfg.vision.patch_size) ** 2 // mcfg.merge_size**2
  prompt = min(sub_len - 1, row_len // 2)
  answer = max(1, min(sub_len - prompt, (row_len - prompt) // 2, own_len))
  (base,), _ = bench.synthetic_examples(mcfg, fam, 1, prompt - n_img, IMAGE)
  rng = np.random.default_rng(0)
  tokens = (mcfg.image_token_id, mcfg.video_token_id)
  specials = tokens + (mcfg.vision_start_token_id, mcfg.vision_end_token_id)
  text_ids = min(mcfg.text.vocab_size, *specials)  # plain text: below every special id
  rows = []
  for _ in range(pairs):
    seqs = []
    for _ in range(2):
      ids = np.concatenate([base.input_ids, rng.integers(0, text_ids, answer)]).astype(np.int32)
      pos = fam.rope_index(ids, base.grid_thw, mcfg).astype(np.int32)
      seqs.append(Encoded(ids, pos, base.pixel_values, base.grid_thw, base.patch_arrays))
    rows.append(pair_layout.pack(*seqs, tokens, lambda g: {}))
  batch = collate(
    rows,
    row_len,
    merge_size=mcfg.merge_size,
    patch_dim=mcfg.vision.patch_dim,
    strength=np.zeros(pairs, np.float32),
  )
  batch.update(pair_layout.layout_arrays(rows, row_len, sub_len, own_len))
  return batch


def train_flops(setup: Setup, batch: dict) -> float:
  host = _stack_micro([batch])
  sds = _abstract(host, shd.batch_shardings(host, setup.mesh, leading=1))
  lowered = setup.trainer.train_step.trace(setup.abstract_state(), sds).lower()
  return float(lowered.cost_analysis()["flops"])


def score_flops(setup: Setup, batch: dict) -> float:
  from flax import nnx

  graphdef, state = nnx.split(setup.abstract_model)
  rows = {k: v[None] for k, v in batch.items() if k != "strength"}
  lowered = _jitted_forward(graphdef, setup.mesh).trace(_abstract(state), _abstract(rows)).lower()
  return float(lowered.cost_analysis()["flops"])


def useful_flops(
  spec: dict, lengths: list[int], patches_per_image: int, images: int, train: bool = True
) -> float:
  """The analytic minimum (module docstring) for sequences of `lengths` real tokens and `images`
  images (once each) of `patches_per_image` patches."""
  lm = sum(
    (6 if train else 2) * spec["n_lm"] * n
    + (3 if train else 1) * spec["lm_layers"] * 2 * n * n * spec["lm_attn_dim"]
    for n in lengths
  )
  vis = images * (
    2 * spec["n_vis"] * patches_per_image
    + spec["vis_layers"] * 4 * patches_per_image**2 * spec["vis_attn_dim"]
  )
  return float(lm + vis)


def _line(**kw):
  print(json.dumps(kw), flush=True)


def run_bench(setup: Setup, spec: dict, legacy: bool) -> None:
  mcfg = setup.spec.model_config
  seq = 1024
  patches = (IMAGE // mcfg.vision.patch_size) ** 2
  t = time.perf_counter()
  batch = pair_batch(mcfg, PAIRS_PER_STEP, seq, "legacy" if legacy else "pairs")
  train = train_flops(setup, batch) / PAIRS_PER_STEP
  rows = batch if legacy else pair_batch(mcfg, PAIRS_PER_STEP, seq, "rows")
  score = score_flops(setup, rows) / PAIRS_PER_STEP
  useful = useful_flops(spec, [seq] * 2, patches, 1)
  useful_score = useful_flops(spec, [seq] * 2, patches, 2, train=False)
  # the tower alone: 16 images in one batch against one
  tower = [_tower_flops(setup, mcfg, n, legacy) for n in (1, 16)]
  _line(
    workload="bench",
    layout="legacy" if legacy else "pairs",
    flops_per_pair=train,
    useful_flops_per_pair=useful,
    ratio=round(train / useful, 4),
    score_flops_per_pair=score,
    score_useful_flops_per_pair=useful_score,
    vision_forward_1_image=tower[0],
    vision_forward_16_images=tower[1],
    vision_16_over_16x1=round(tower[1] / (16 * tower[0]), 4),
    seconds=round(time.perf_counter() - t, 1),
  )


def _tower_flops(setup: Setup, mcfg, n: int, legacy: bool) -> float:
  from flax import nnx

  from mrm_jax.models import common

  side = IMAGE // mcfg.vision.patch_size
  thw = np.asarray([[1, side, side]] * n, np.int32)
  fam = get_family("qwen2_vl")
  seg = np.repeat(np.arange(1, n + 1, dtype=np.int32), side * side)
  pos = fam.vision_patch_arrays(thw, mcfg)["vision_pos_ids"]
  pixels = jax.ShapeDtypeStruct((n * side * side, mcfg.vision.patch_dim), np.float32)
  visual = setup.abstract_model.backbone.visual
  graphdef, state = nnx.split(visual)

  def tower(state, pixels, seg, pos, layout):
    items = None if layout is None else common.ItemLayout(*layout)
    return nnx.merge(graphdef, state)(pixels, seg, pos, items=items)[0]

  layout = None if legacy else tuple(vision_layout.item_layout(seg))
  args = (
    _abstract(state),
    pixels,
    _abstract(seg),
    _abstract(pos),
    None if layout is None else _abstract(layout),
  )
  return float(jax.jit(tower).trace(*args).lower().cost_analysis()["flops"])


def prompt_once_useful(spec: dict, prompt: int, chosen: int, rejected: int, patches: int) -> float:
  """The minimum of one pair with its prompt encoded once: 6·N_lm per distinct token, causal
  attention over the prompt once and each response over the prompt and itself, the image once."""
  tokens = prompt + chosen + rejected
  pairs = prompt * prompt + sum(2 * n * prompt + n * n for n in (chosen, rejected))  # x (1/2)
  attn = 3 * spec["lm_layers"] * 2 * pairs * spec["lm_attn_dim"]
  vis = 2 * spec["n_vis"] * patches + spec["vis_layers"] * 4 * patches**2 * spec["vis_attn_dim"]
  return float(6 * spec["n_lm"] * tokens + attn + vis)


def dt2it_pairs(n: int, seed: int, img_tokens: int) -> list[tuple[int, int, int]]:
  """(prompt, chosen response, rejected response) token counts of `n` DT2IT-like pairs."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(max(300, img_tokens + 1), 1301, size=n)
  chosen, rejected = rng.integers(100, 401, size=n), rng.integers(100, 401, size=n)
  return [(int(p), int(c), int(r)) for p, c, r in zip(prompt, chosen, rejected)]


def dt2it_lengths(n: int, seed: int, img_tokens: int) -> list[tuple[int, int]]:
  """(chosen row, rejected row) token counts of `n` DT2IT-like pairs."""
  return [(p + c, p + r) for p, c, r in dt2it_pairs(n, seed, img_tokens)]


def run_dt2it(
  setup: Setup,
  spec: dict,
  n_pairs: int,
  seed: int,
  group: int,
  legacy: bool,
  buckets: tuple[int, ...] = BUCKETS,
) -> None:
  mcfg = setup.spec.model_config
  patches = (IMAGE // mcfg.vision.patch_size) ** 2
  pairs = dt2it_lengths(n_pairs, seed, patches // mcfg.merge_size**2)
  fits = [b for b in buckets if b >= max(max(p) for p in pairs)]
  if not fits:
    raise SystemExit("a pair is longer than the largest bucket")
  per_bucket_train, per_bucket_score = {}, {}
  for b in buckets:
    batch = pair_batch(mcfg, PAIRS_PER_STEP, b, "legacy" if legacy else "pairs")
    per_bucket_train[b] = train_flops(setup, batch)
    rows = batch if legacy else pair_batch(mcfg, PAIRS_PER_STEP, b, "rows")
    per_bucket_score[b] = score_flops(setup, rows)
  # the same step's executed / useful ratio without padding (every row exactly one bucket long)
  base = {
    b: per_bucket_train[b] / useful_flops(spec, [b] * 2 * PAIRS_PER_STEP, patches, PAIRS_PER_STEP)
    for b in buckets
  }
  longer = np.asarray([max(p) for p in pairs])
  orders = {
    "random": epoch_order(n_pairs, seed=seed, epoch=0),
    "length_grouped": epoch_order(
      n_pairs, seed=seed, epoch=0, lengths=longer, batch_size=PAIRS_PER_STEP, group_batches=group
    ),
  }
  for name, order in orders.items():
    executed = score = useful = unpadded = 0.0
    tokens = real = 0
    used = {b: 0 for b in buckets}
    for i in range(0, n_pairs // PAIRS_PER_STEP * PAIRS_PER_STEP, PAIRS_PER_STEP):
      batch = [pairs[j] for j in order[i : i + PAIRS_PER_STEP]]
      rows = [c for c, _ in batch] + [r for _, r in batch]
      bucket = min(b for b in buckets if b >= max(rows))
      used[bucket] += 1
      executed += per_bucket_train[bucket]
      score += per_bucket_score[bucket]
      u = useful_flops(spec, rows, patches, PAIRS_PER_STEP)
      useful += u
      unpadded += u * base[bucket]
      tokens += bucket * len(rows)
      real += sum(rows)
    steps = sum(used.values())
    n = steps * PAIRS_PER_STEP
    _line(
      workload="dt2it",
      layout="legacy" if legacy else "pairs",
      order=name,
      pairs=n,
      buckets=list(buckets),
      flops_per_pair=executed / n,
      useful_flops_per_pair=useful / n,
      score_flops_per_pair=score / n,
      padding_ratio=round(executed / unpadded, 4),
      real_token_fraction=round(real / tokens, 4),
      batches_per_bucket=used,
    )


def run_dt2it_shared(
  setup: Setup, spec: dict, n_pairs: int, seed: int, group: int, buckets: tuple[int, ...]
) -> None:
  mcfg = setup.spec.model_config
  patches = (IMAGE // mcfg.vision.patch_size) ** 2
  pairs = dt2it_pairs(n_pairs, seed, patches // mcfg.merge_size**2)
  rows = row_buckets(buckets)
  packed = np.asarray([p + c + r for p, c, r in pairs])
  order = epoch_order(
    n_pairs, seed=seed, epoch=0, lengths=packed, batch_size=PAIRS_PER_STEP, group_batches=group
  )
  executed = useful = once = 0.0
  shapes: dict[tuple[int, int, int], float] = {}
  real = tokens = steps = 0
  for i in range(0, n_pairs // PAIRS_PER_STEP * PAIRS_PER_STEP, PAIRS_PER_STEP):
    batch = [pairs[j] for j in order[i : i + PAIRS_PER_STEP]]
    row_len = min(b for b in rows if b >= max(p + c + r for p, c, r in batch))
    sub_len = min(b for b in buckets if b >= max(p + max(c, r) for p, c, r in batch))
    own_len = min(b for b in own_buckets(buckets) if b >= max(r for _, _, r in batch))
    shape = (row_len, sub_len, own_len)
    if shape not in shapes:
      shapes[shape] = train_flops(setup, shared_prompt_batch(mcfg, PAIRS_PER_STEP, *shape))
    executed += shapes[shape]
    lengths = [n for p, c, r in batch for n in (p + c, p + r)]
    useful += useful_flops(spec, lengths, patches, PAIRS_PER_STEP)
    once += sum(prompt_once_useful(spec, p, c, r, patches) for p, c, r in batch)
    real += sum(p + c + r for p, c, r in batch)
    tokens += row_len * PAIRS_PER_STEP
    steps += 1
  n = steps * PAIRS_PER_STEP
  _line(
    workload="dt2it",
    layout="shared_prompt",
    order="length_grouped",
    pairs=n,
    buckets=list(buckets),
    flops_per_pair=executed / n,
    useful_flops_per_pair=useful / n,
    prompt_once_useful_flops_per_pair=once / n,
    ratio_to_prompt_once=round(executed / once, 4),
    real_token_fraction=round(real / tokens, 4),
    compiled_shapes=len(shapes),
  )


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workload", choices=["bench", "dt2it"], default="bench")
  p.add_argument("--legacy", action="store_true", help="the pre-issue-17 layout, for comparison")
  p.add_argument(
    "--layout",
    choices=["pairs", "shared_prompt"],
    default="pairs",
    help="dt2it: two rows per pair (pairs) or one (shared_prompt)",
  )
  p.add_argument("--preset", default="qwen2-vl-2b", help="Qwen2-VL preset (tiny: a quick check)")
  p.add_argument("--pairs", type=int, default=512, help="dt2it: pairs drawn")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--group", type=int, default=16, help="dt2it: batches per length group")
  p.add_argument(
    "--buckets", type=int, nargs="+", default=list(BUCKETS), help="dt2it: sequence buckets"
  )
  a = p.parse_args(argv)
  setup = _setup(a.preset)
  spec = _model_flops_spec(setup, None)
  if a.workload == "bench":
    run_bench(setup, spec, a.legacy)
  elif a.layout == "shared_prompt":
    run_dt2it_shared(setup, spec, a.pairs, a.seed, a.group, tuple(sorted(a.buckets)))
  else:
    run_dt2it(setup, spec, a.pairs, a.seed, a.group, a.legacy, tuple(sorted(a.buckets)))


if __name__ == "__main__":
  main()
