"""The train step lowered for CUDA on this CPU-only machine: with `model.attention = auto` and bf16
the language model's attention (and the vision tower's) is cuDNN's fused attention, and no vision
attention tensor spans more than one image.

jax asks the local cuDNN for its version and the local GPU for its compute capability while
tracing the cuDNN call; neither exists here, so the test answers as an H200 would (cuDNN 9.10,
sm_90) and tells `resolve_attention` that the platform is CUDA."""

from __future__ import annotations

import re

import jax
import numpy as np
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
from test_qwen2_5_vl import make_example, tiny_config  # noqa: E402
from test_vision_layout import _encoded  # noqa: E402

from mrm_jax.config import base_config
from mrm_jax.models import common, pair_layout
from mrm_jax.models.processor import collate, pair_share
from mrm_jax.train import sharding as shd
from mrm_jax.train.loop import Setup, _stack_micro

BUDGET = 212  # patches of the batch (a number no other dimension has)


def _batch(fam, cfg):
  rng = np.random.default_rng(0)
  vision = [[("image", (1, 8, 8)), ("image", (1, 4, 6))], [("image", (1, 6, 6))]]
  chosen = [
    make_example(cfg, [("text", 3), *[x for it in v for x in (it, ("text", 2))]], rng)
    for v in vision
  ]
  rejected = []
  for c, v in zip(chosen, vision):
    r = make_example(cfg, [("text", 5), *[x for it in v for x in (it, ("text", 1))]], rng)
    r["items"] = c["items"]
    rejected.append(r)
  enc = [_encoded(fam, cfg, e) for e in chosen + rejected]
  seq = max(e.length for e in enc) + 5
  return collate(
    enc,
    seq,
    BUDGET,
    merge_size=cfg.merge_size,
    patch_dim=cfg.vision.patch_dim,
    strength=np.zeros(2, np.float32),
    share=pair_share(4),
  )


def _shared_prompt_batch(fam, cfg):
  """The same two pairs' vision in the shared-prompt layout: one row per pair."""
  rng = np.random.default_rng(0)
  vision = [[("image", (1, 8, 8)), ("image", (1, 4, 6))], [("image", (1, 6, 6))]]
  pairs = []
  for v in vision:
    prompt = make_example(cfg, [("text", 3), *[x for it in v for x in (it, ("text", 2))]], rng)
    c, r = (
      _encoded(fam, cfg, dict(prompt, ids=np.concatenate([prompt["ids"], rng.integers(1, 400, n)])))
      for n in (4, 6)
    )
    pairs.append(pair_layout.pack(c, r, (cfg.image_token_id, cfg.video_token_id), lambda g: {}))
  assert all(p.shared for p in pairs)
  seq = max(p.length for p in pairs) + 5
  batch = collate(
    pairs,
    seq,
    BUDGET,
    merge_size=cfg.merge_size,
    patch_dim=cfg.vision.patch_dim,
    strength=np.zeros(2, np.float32),
  )
  sub = max(p.sub_length for p in pairs) + 3
  sub, own = sub + sub % 2, 8  # even lengths, as cuDNN's biased attention needs (buckets are)
  batch.update(pair_layout.layout_arrays(pairs, seq, sub, own))
  return batch


def _cuda_program(monkeypatch, fam, mcfg, batch) -> tuple[str, list[str]]:
  """The train step on `batch` lowered for CUDA (bf16, attention auto) and its custom calls."""
  monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda c: True)
  monkeypatch.setattr(common, "default_platform", lambda: "cuda")
  cfg = base_config()
  cfg.model.family, cfg.model.preset = "qwen2_vl", "tiny"
  cfg.model.dtype, cfg.model.attention = "bfloat16", "auto"
  cfg.train.batch_size = 2
  setup = Setup(cfg, num_steps=4, devices=jax.devices()[:1])  # one chip, like the H200 check
  assert setup.abstract_model.backbone.language_model.layers[0].self_attn.attention == "cudnn"

  host = _stack_micro([batch])
  assert host["pixel_values"].shape[1] == BUDGET
  sh = shd.batch_shardings(host, setup.mesh, leading=1)
  sds = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in host.items()}
  text = (
    setup.trainer.train_step.trace(setup.abstract_state(), sds)
    .lower(lowering_platforms=("cuda",))
    .as_text()
  )
  targets = re.findall(r"custom_call @(\S+?)\(", text) + re.findall(
    r'call_target_name = "([^"]+)"', text
  )
  return text, targets


def test_train_step_lowers_to_cudnn_and_attends_per_image(monkeypatch):
  fam, mcfg = tiny_config("qwen2_vl")
  text, targets = _cuda_program(monkeypatch, fam, mcfg, _batch(fam, mcfg))
  fwd = [t for t in targets if t == "__cudnn$fmhaSoftmax"]
  bwd = [t for t in targets if t == "__cudnn$fmhaSoftmaxBackward"]
  text_layers, vision_blocks = mcfg.text.num_hidden_layers, mcfg.vision.depth
  # every LM layer forward and backward, every (frozen) vision block forward
  assert len(fwd) == text_layers + vision_blocks and len(bwd) == text_layers, sorted(set(targets))
  # no tensor pairs the batch's patches with themselves (the full square of the masked path):
  # vision attention runs on [items, largest item] rows
  for shape in re.findall(r"tensor<([0-9x]+)x(?:bf16|f32|f16|i1)>", text):
    dims = [int(d) for d in shape.split("x")]
    assert dims.count(BUDGET) <= 1, shape
  # vision q / k / v: [3 images (each pair's once), 64 patches (the largest), 2 heads, head dim 16]
  assert "tensor<3x64x2x16xbf16>" in text


def test_shared_prompt_layout_lowers_to_two_fused_calls_per_layer(monkeypatch):
  """Each LM layer of the shared-prompt layout: two cuDNN fused calls forward (sequence A causal,
  the rejected response's tokens against sequence B under a bias) and two backward; the vision
  tower as before."""
  fam, mcfg = tiny_config("qwen2_vl")
  text, targets = _cuda_program(monkeypatch, fam, mcfg, _shared_prompt_batch(fam, mcfg))
  fwd = [t for t in targets if t.startswith("__cudnn$fmha") and "Backward" not in t]
  bwd = [t for t in targets if t.startswith("__cudnn$fmha") and "Backward" in t]
  text_layers, vision_blocks = mcfg.text.num_hidden_layers, mcfg.vision.depth
  assert len(fwd) == 2 * text_layers + vision_blocks, sorted(set(targets))
  assert len(bwd) == 2 * text_layers, sorted(set(targets))
  # the rejected block's call takes its mask as a bias
  assert fwd.count("__cudnn$fmhaScaleBiasSoftmax") == text_layers, sorted(set(targets))
