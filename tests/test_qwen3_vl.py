"""Qwen3-VL parity against transformers' PyTorch model (float32, tiny random configs)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from test_qwen2_5_vl import (  # noqa: E402  (shared parity helpers)
  end_to_end_check,
  jax_batch,
  make_example,
  param_count_ours,
  param_count_torch_meta,
  run_cases,
  save_hf_dir,
  tiny_config,
  torch_inputs,
  torch_model,
)

from mrm_jax.models import get_family, hf_io  # noqa: E402

FAMILY = "qwen3_vl"


def frame_video_tokens(cfg, thw, rng):
  """Qwen3-VL's video layout: a timestamp (a few text tokens) then one vision start / end group per
  temporal patch."""
  t, h, w = thw
  n = h * w // cfg.merge_size**2
  out = []
  for _ in range(t):
    out += rng.integers(1, 400, size=3).tolist()
    out += [cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id]
  return out


CASES = {
  # grids smaller, equal and larger than the 8x8 learned position table, non-square
  "images": [
    [
      ("text", 5),
      ("image", (1, 8, 12)),
      ("text", 3),
      ("image", (1, 6, 10)),
      ("text", 4),
      ("image", (1, 2, 2)),
      ("text", 6),
    ]
  ],
  "one_image": [[("text", 4), ("image", (1, 8, 8)), ("text", 9)]],
  "video": [[("text", 3), ("video", (3, 6, 4)), ("text", 7)]],
  "no_image": [[("text", 17)]],
  "long_prompt": [[("text", 150), ("image", (1, 4, 6)), ("text", 120)]],
  "mixed_batch": [
    [("text", 2), ("image", (1, 6, 6)), ("text", 3)],
    [("text", 20)],
    [("text", 3), ("video", (2, 4, 8)), ("text", 2), ("image", (1, 10, 4)), ("text", 5)],
    [("text", 4), ("image", (1, 4, 4)), ("text", 1), ("image", (1, 12, 14)), ("text", 2)],
  ],
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  fam, cfg = tiny_config(FAMILY)
  out = {}
  for seed in (0, 1):
    model, head = torch_model(cfg, seed)
    path = save_hf_dir(model, head, tmp_path_factory.mktemp(f"q3_{seed}"))
    out[seed] = (cfg, model, head, path)
  return out


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_all_cases(hf_dirs, seed):
  """Loaded through hf_io from a transformers-saved directory (+ value head), every case matches
  PyTorch
  within 1e-4 (deepstack, interpolated position table, interleaved M-RoPE, q/k norm, per-frame
  video)."""
  fam = get_family(FAMILY)
  cfg, model, head, path = hf_dirs[seed]
  ours = hf_io.load_hf(path)
  rng = np.random.default_rng(seed)
  run_cases(fam, cfg, model, head, ours, CASES, rng, video_tokens=frame_video_tokens)
  run_cases(fam, cfg, model, head, ours, {"text_only_batch": CASES["no_image"] * 2}, rng)


def test_rope_index_matches_transformers(hf_dirs):
  fam = get_family(FAMILY)
  cfg, model, _, _ = hf_dirs[0]
  rng = np.random.default_rng(5)
  examples = [
    make_example(cfg, s, rng, frame_video_tokens) for s in CASES["mixed_batch"] + CASES["video"]
  ]
  seq_len = max(len(e["ids"]) for e in examples) + 2
  batch = jax_batch(fam, cfg, examples, seq_len, 4096)
  inputs = torch_inputs(cfg, examples, seq_len)
  want, _ = model.model.get_rope_index(
    inputs["input_ids"],
    inputs["mm_token_type_ids"],
    inputs.get("image_grid_thw"),
    inputs.get("video_grid_thw").clone(),
    attention_mask=inputs["attention_mask"],
  )
  m = batch["attention_mask"].astype(bool)
  np.testing.assert_array_equal(batch["position_ids"][:, m], want.numpy()[:, m])


@pytest.mark.parametrize(
  "grids", [[(1, 8, 12)], [(1, 6, 10), (2, 4, 4), (1, 2, 2)], [(3, 16, 16), (1, 10, 14)]]
)
@pytest.mark.parametrize("side", [8, 48])
def test_pos_embed_interpolation_matches_transformers(grids, side):
  from transformers.vision_utils import get_vision_interpolation_indices_and_weights

  fam = get_family(FAMILY)
  idx, w = fam.pos_embed_interpolation(np.asarray(grids), side, 2)
  t_idx, t_w = get_vision_interpolation_indices_and_weights(
    torch.tensor(grids), side, mode="bilinear", align_corners=True, spatial_merge_size=2
  )
  np.testing.assert_array_equal(idx, t_idx.numpy())
  np.testing.assert_array_equal(w, t_w.numpy())


def test_video_placeholder_text_matches_transformers():
  """Per temporal patch: `<t seconds>` + its own vision start/end group, timestamps as transformers'
  processor computes them for a frame list (24 fps, pairs of frames averaged, odd counts padded)."""
  fam, cfg = tiny_config(FAMILY)
  from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

  calc = Qwen3VLProcessor._calculate_timestamps
  for n in (4, 5, 11):
    t = -(-n // 2)
    assert fam.frame_timestamps(t, 2, num_frames=n) == calc(None, list(range(n)), 24, 2)
  text = fam.placeholder_text("video", (3, 4, 6), cfg, 2, num_frames=6)
  group = "<|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>"
  assert text == "<0.0 seconds>" + group + "<0.1 seconds>" + group + "<0.2 seconds>" + group
  assert fam.placeholder_text("image", (1, 4, 6), cfg, 2) == (
    "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>"
  )


@pytest.mark.parametrize("preset", ["qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b"])
def test_param_count_matches_transformers(preset):
  fam = get_family(FAMILY)
  cfg = fam.PRESETS[preset]
  assert param_count_ours(fam, cfg) == param_count_torch_meta(cfg)


def test_config_round_trip():
  fam = get_family(FAMILY)
  for cfg in fam.PRESETS.values():
    assert fam.Config.from_hf(cfg.to_hf()) == cfg
    hf = transformers.AutoConfig.for_model(**cfg.to_hf())
    assert fam.Config.from_hf(hf.to_dict()) == cfg
  # the hub's layout: rope settings under text_config.rope_scaling, rope_theta beside them
  hub = fam.PRESETS["qwen3-vl-8b"].to_hf()
  rope = hub["text_config"].pop("rope_parameters")
  hub["text_config"]["rope_theta"] = rope.pop("rope_theta")
  hub["text_config"]["rope_scaling"] = rope
  assert fam.Config.from_hf(hub) == fam.PRESETS["qwen3-vl-8b"]


def test_end_to_end_processor_and_loader(tmp_path):
  end_to_end_check(FAMILY, tmp_path, seed=2, image_mean=(0.5, 0.5, 0.5))
