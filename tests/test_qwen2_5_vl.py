"""Qwen2.5-VL parity against transformers' PyTorch model (float32, tiny random configs).

The helpers at the top (random examples → our numpy batch and transformers' inputs, HF directory
round trip) are shared with tests/test_qwen3_vl.py.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from mrm_jax.models import common, get_family, hf_io  # noqa: E402

# special token ids inside the tiny vocabulary (the real ones are ~151k)
SPECIAL = dict(
  image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503
)
PAD_ID = 0


# ----------------------------------------------------------------------------------------------
# Shared helpers


def tiny_config(family: str, **vision_overrides):
  fam = get_family(family)
  cfg = fam.PRESETS["tiny"]
  if vision_overrides:
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision_overrides))
  return fam, dataclasses.replace(cfg, **SPECIAL)


def default_video_tokens(cfg, thw, rng):
  n = int(np.prod(thw)) // cfg.merge_size**2
  return [cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id]


def make_example(cfg, segments, rng, video_tokens=default_video_tokens):
  """`segments`: ("text", n) | ("image", (t, h, w)) | ("video", (t, h, w)) with (t, h, w) the patch
  grid.
  Returns `{"ids", "items": [(kind, thw, pixels [t*h*w, patch_dim])]}` with random text and
  pixels."""
  ids, items = [], []
  for kind, arg in segments:
    if kind == "text":
      ids += rng.integers(1, 400, size=arg).tolist()
      continue
    thw = tuple(int(x) for x in arg)
    pixels = rng.standard_normal((int(np.prod(thw)), cfg.vision.patch_dim)).astype(np.float32)
    items.append((kind, thw, pixels))
    if kind == "image":
      n = int(np.prod(thw)) // cfg.merge_size**2
      ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
    else:
      ids += video_tokens(cfg, thw, rng)
  return {"ids": np.asarray(ids, np.int64), "items": items}


def jax_batch(fam, cfg, examples, seq_len, patch_budget, rope_kwargs=None):
  """Our batch dict (what `processor.collate` produces), built with the family's numpy hooks."""
  b = len(examples)
  input_ids = np.full((b, seq_len), PAD_ID, np.int32)
  mask = np.zeros((b, seq_len), np.int32)
  pos = np.zeros((3, b, seq_len), np.int32)
  pixels = np.zeros((patch_budget, cfg.vision.patch_dim), np.float32)
  seg = np.zeros((patch_budget,), np.int32)
  extra: dict[str, np.ndarray] = {}
  p = frame_id = 0
  seg_offsets: dict[str, int] = {}
  for i, ex in enumerate(examples):
    n = len(ex["ids"])
    input_ids[i, :n] = ex["ids"]
    mask[i, :n] = 1
    grids = np.asarray([thw for _, thw, _ in ex["items"]], np.int64).reshape(-1, 3)
    pos[:, i, :n] = fam.rope_index(ex["ids"], grids, cfg, **((rope_kwargs or [{}] * b)[i]))
    start = p
    for _, (t, h, w), px in ex["items"]:
      pixels[p : p + len(px)] = px
      for _ in range(t):
        frame_id += 1
        seg[p : p + h * w] = frame_id
        p += h * w
    if len(grids):
      for name, arr in fam.vision_patch_arrays(grids, cfg).items():
        dst = extra.setdefault(name, np.zeros((patch_budget,) + arr.shape[1:], arr.dtype))
        if name.endswith("_segment_ids"):
          off = seg_offsets.get(name, 0)
          arr = np.where(arr > 0, arr + off, 0)
          seg_offsets[name] = int(arr.max(initial=off))
        dst[start:p] = arr
  assert p <= patch_budget
  batch = dict(
    input_ids=input_ids,
    attention_mask=mask,
    position_ids=pos,
    pixel_values=pixels,
    vision_segment_ids=seg,
    **extra,
  )
  if p == 0:  # no vision at all: a zero patch budget
    batch["pixel_values"] = np.zeros((0, cfg.vision.patch_dim), np.float32)
    batch["vision_segment_ids"] = np.zeros((0,), np.int32)
    for name in extra:
      batch[name] = extra[name][:0]
    for name, arr in fam.vision_patch_arrays(np.asarray([[1, 2, 2]]), cfg).items():
      batch[name] = np.zeros((0,) + arr.shape[1:], arr.dtype)
  return batch


def torch_inputs(cfg, examples, seq_len, second_per_grid_ts=None):
  """transformers' inputs for the same examples (right padding, images and videos split)."""
  b = len(examples)
  ids = torch.full((b, seq_len), PAD_ID, dtype=torch.long)
  mask = torch.zeros((b, seq_len), dtype=torch.long)
  for i, ex in enumerate(examples):
    ids[i, : len(ex["ids"])] = torch.from_numpy(ex["ids"])
    mask[i, : len(ex["ids"])] = 1
  tt = torch.zeros_like(ids)
  tt[ids == cfg.image_token_id] = 1
  tt[ids == cfg.video_token_id] = 2
  out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=tt)
  for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
    items = [(thw, px) for ex in examples for k, thw, px in ex["items"] if k == kind]
    if items:
      out[key] = torch.from_numpy(np.concatenate([px for _, px in items]))
      out[f"{kind}_grid_thw"] = torch.tensor([thw for thw, _ in items], dtype=torch.long)
  if second_per_grid_ts is not None:
    out["second_per_grid_ts"] = torch.tensor(second_per_grid_ts, dtype=torch.float32)
  return out


def torch_model(cfg, seed: int):
  """A transformers model for `cfg` with every parameter randomly perturbed (biases and norm scales
  included, so none of them can be silently ignored), plus a random value head."""
  hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForImageTextToText.from_config(
    hf_cfg, attn_implementation="eager"
  ).eval()
  with torch.no_grad():
    for prm in model.parameters():
      prm.add_(0.05 * torch.randn_like(prm))
  head = torch.nn.Linear(cfg.hidden_size, 1)
  return model, head


def torch_forward(model, head, inputs):
  with torch.no_grad():
    hidden = model.model(**inputs).last_hidden_state
    last = inputs["attention_mask"].sum(-1) - 1
    reward = head(hidden[torch.arange(hidden.shape[0]), last])[:, 0]
  return hidden.numpy(), reward.numpy()


def save_hf_dir(model, head, path, legacy_names: bool = False):
  """`save_pretrained` + LLaMA-Factory's value_head.safetensors; optionally rewrites the weight
  names to
  the older hub layout (`model.layers.*`, `visual.*`)."""
  model.save_pretrained(path)
  save_file(
    {
      hf_io.V_HEAD_WEIGHT: head.weight.detach().numpy().copy(),
      hf_io.V_HEAD_BIAS: head.bias.detach().numpy().copy(),
    },
    str(path / hf_io.VALUE_HEAD_FILE),
  )
  if legacy_names:
    files = sorted(p for p in path.glob("model*.safetensors"))
    assert files and not (path / "model.safetensors.index.json").exists()
    for f in files:
      tensors = load_file(str(f))
      renamed = {hf_io.legacy_name(k): v for k, v in tensors.items()}
      assert any(k.startswith("visual.") for k in renamed) and any(
        k.startswith("model.layers.") for k in renamed
      )
      save_file(renamed, str(f), metadata={"format": "pt"})
  return path


def run_ours(model, batch):
  fn = nnx.jit(lambda m, b: m.hidden_and_rewards(b))
  hidden, rewards = fn(model, {k: jnp.asarray(v) for k, v in batch.items()})
  return np.asarray(hidden), np.asarray(rewards)


def assert_parity(hidden, rewards, t_hidden, t_rewards, mask, atol=1e-4):
  m = mask.astype(bool)
  err_h = float(np.max(np.abs(hidden[m] - t_hidden[m])))
  err_r = float(np.max(np.abs(rewards - t_rewards)))
  assert err_h < atol, f"last hidden state differs by {err_h}"
  assert err_r < atol, f"rewards differ by {err_r}"
  assert np.abs(t_rewards).max() > 1e-3  # a meaningful, non-degenerate comparison


def param_count_torch_meta(cfg) -> int:
  try:
    from transformers.initialization import no_init_weights
  except ImportError:  # older transformers
    from transformers.modeling_utils import no_init_weights
  hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
  with torch.device("meta"), no_init_weights():
    model = transformers.AutoModelForImageTextToText.from_config(hf_cfg)
  # the LM head is never built here (tied or not); everything else counts once
  return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("lm_head."))


def param_count_ours(fam, cfg) -> int:
  with common.abstract_params():  # shapes only; nothing is initialised
    abstract = nnx.eval_shape(lambda: fam.Backbone(cfg, rngs=nnx.Rngs(0)))
  return common.count_params(abstract)


def end_to_end_check(family: str, tmp_path, seed: int, image_mean=None, second_per_grid_ts=None):
  """A full HF directory (transformers weights, tokenizer, preprocessor config, value head) loaded
  with
  `load_reward_model`; records with images of different sizes, a 5-frame video and plain text go
  through the processor (chat template, family placeholder / rope / per-patch hooks) and `collate`;
  PyTorch scores
  the same token ids and patches with its own rope index."""
  import model_fixtures as mf
  from PIL import Image

  from mrm_jax.models import load_reward_model

  d = tmp_path / "model"
  tok = mf.build_tokenizer(d)
  ids = mf.special_ids(tok)
  fam, cfg = tiny_config(family)
  text_ids = {
    k: v
    for k, v in (("bos_token_id", None), ("eos_token_id", ids["<|im_end|>"]))
    if k in {f.name for f in dataclasses.fields(cfg.text)}
  }
  cfg = dataclasses.replace(
    cfg,
    text=dataclasses.replace(cfg.text, vocab_size=len(tok), **text_ids),
    image_token_id=ids["<|image_pad|>"],
    video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"],
    vision_end_token_id=ids["<|vision_end|>"],
  )
  model, head = torch_model(cfg, seed)
  save_hf_dir(model, head, d)
  unit = cfg.vision.patch_size * cfg.merge_size
  mf.save_preprocessor(
    d, patch_size=cfg.vision.patch_size, min_pixels=unit * unit, max_pixels=unit * unit * 20
  )
  if image_mean is not None:
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
      pc = json.loads((d / name).read_text())
      pc.update(image_mean=list(image_mean), image_std=list(image_mean))
      (d / name).write_text(json.dumps(pc))
  imgs = tmp_path / "images"
  imgs.mkdir()
  rng = np.random.default_rng(seed)
  for name, (w, h) in {"a.png": (70, 130), "b.png": (150, 60), "c.png": (64, 64)}.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(imgs / name)
  frames = [f"f{i}.png" for i in range(5)]
  for f in frames:
    Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(imgs / f)
  records = [
    {
      "images": ["a.png", "b.png"],
      "question": "Image 1 <image> Image 2 <image> Which is better?",
      "answer": "Image 2 is better than Image 1.",
    },
    {
      "images": [],
      "videos": [frames],
      "question": "<video> Describe the picture.",
      "answer": "A red circle.",
    },
    {"images": [], "question": "What is in the image?", "answer": "The answer is yes."},
    {"images": ["c.png"], "question": "The cat sits on the mat.", "answer": "No."},
  ]
  ours, proc = load_reward_model(d)
  enc = [proc.encode(r, imgs, 512) for r in records]
  seq_len = max(e.length for e in enc) + 2
  batch = proc.collate(enc, seq_len)
  examples = []
  for e in enc:
    items, p = [], 0
    for kind, thw in zip(e.vision_kinds, e.grid_thw.tolist()):
      n = int(np.prod(thw))
      items.append((kind, tuple(thw), e.pixel_values[p : p + n]))
      p += n
    examples.append({"ids": e.input_ids.astype(np.int64), "items": items})
  assert [k for e in examples for k, _, _ in e["items"]] == ["image", "image", "video", "image"]
  inputs = torch_inputs(cfg, examples, seq_len, second_per_grid_ts=second_per_grid_ts)
  t_hidden, t_rewards = torch_forward(model, head, inputs)
  m = batch["attention_mask"].astype(bool)
  np.testing.assert_array_equal(batch["input_ids"][m], inputs["input_ids"].numpy()[m])
  hidden, rewards = run_ours(ours, batch)
  assert_parity(hidden, rewards, t_hidden, t_rewards, batch["attention_mask"])


# ----------------------------------------------------------------------------------------------
# Qwen2.5-VL

FAMILY = "qwen2_5_vl"

CASES = {
  # several images of different sizes (windows padded on both axes, one grid smaller than a window)
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
  "one_image": [[("text", 4), ("image", (1, 12, 8)), ("text", 9)]],
  "video": [[("text", 3), ("video", (3, 8, 6)), ("text", 7)]],
  "no_image": [[("text", 17)]],
  "long_prompt": [[("text", 150), ("image", (1, 4, 6)), ("text", 120)]],
  # a padded batch mixing all of the above, images and videos interleaved
  "mixed_batch": [
    [("text", 2), ("image", (1, 6, 6)), ("text", 3)],
    [("text", 20)],
    [("text", 3), ("video", (2, 4, 8)), ("text", 2), ("image", (1, 10, 4)), ("text", 5)],
    [("text", 4), ("image", (1, 4, 4)), ("text", 1), ("image", (1, 8, 8)), ("text", 2)],
  ],
}


def _second_per_grid_ts(examples, rng):
  """Per-video seconds per temporal patch, chosen so that positions advance by non-integer steps."""
  per_example = [
    [float(rng.choice([0.5, 0.75, 1.3])) for k, _, _ in ex["items"] if k == "video"]
    for ex in examples
  ]
  return per_example, [s for row in per_example for s in row]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """Per seed: (cfg, torch model, head, saved HF dir)."""
  fam, cfg = tiny_config(FAMILY)
  out = {}
  for seed in (0, 1):
    model, head = torch_model(cfg, seed)
    path = save_hf_dir(model, head, tmp_path_factory.mktemp(f"q25_{seed}"))
    out[seed] = (cfg, model, head, path)
  return out


def run_cases(
  fam,
  cfg,
  model,
  head,
  ours,
  cases,
  rng,
  seq_extra=3,
  rope_kwargs_fn=None,
  second_fn=None,
  video_tokens=default_video_tokens,
):
  """All cases' rows in ONE padded batch (one compilation), checked row by row against PyTorch."""
  names, examples = [], []
  for name, segs in cases.items():
    for s in segs:
      names.append(name)
      examples.append(make_example(cfg, s, rng, video_tokens))
  seq_len = max(len(e["ids"]) for e in examples) + seq_extra
  budget = sum(int(np.prod(thw)) for e in examples for _, thw, _ in e["items"])
  budget = -(-(budget + 8) // 4) * 4 if budget else 0
  per_ex, flat = second_fn(examples, rng) if second_fn else ([{}] * len(examples), None)
  batch = jax_batch(
    fam,
    cfg,
    examples,
    seq_len,
    budget,
    rope_kwargs=[rope_kwargs_fn(x) for x in per_ex] if rope_kwargs_fn else None,
  )
  inputs = torch_inputs(cfg, examples, seq_len, second_per_grid_ts=flat or None)
  t_hidden, t_rewards = torch_forward(model, head, inputs)
  hidden, rewards = run_ours(ours, batch)
  for i, name in enumerate(names):
    m = batch["attention_mask"][i : i + 1]
    try:
      assert_parity(
        hidden[i : i + 1], rewards[i : i + 1], t_hidden[i : i + 1], t_rewards[i : i + 1], m
      )
    except AssertionError as e:
      raise AssertionError(f"case {name} (row {i}): {e}") from None
  return batch


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_all_cases(hf_dirs, seed):
  """Loaded through hf_io from a transformers-saved directory, every case matches PyTorch within
  1e-4: one image, several images of different sizes, video, no image, a long prompt, and a padded
  mixed batch
  (all in one batch, so examples also cannot leak into each other), then a batch without any
  vision."""
  fam = get_family(FAMILY)
  cfg, model, head, path = hf_dirs[seed]
  ours = hf_io.load_hf(path)
  rng = np.random.default_rng(seed)
  kw = dict(rope_kwargs_fn=lambda s: {"second_per_grid_ts": s}, second_fn=_second_per_grid_ts)
  run_cases(fam, cfg, model, head, ours, CASES, rng, **kw)
  run_cases(fam, cfg, model, head, ours, {"text_only_batch": CASES["no_image"] * 2}, rng, **kw)


def test_rope_index_matches_transformers(hf_dirs):
  """Position ids (text, images, videos with fractional seconds per grid) equal transformers'
  get_rope_index."""
  fam = get_family(FAMILY)
  cfg, model, _, _ = hf_dirs[0]
  rng = np.random.default_rng(3)
  examples = [make_example(cfg, s, rng) for s in CASES["mixed_batch"] + CASES["video"]]
  per_ex, flat = _second_per_grid_ts(examples, rng)
  seq_len = max(len(e["ids"]) for e in examples) + 2
  batch = jax_batch(
    fam, cfg, examples, seq_len, 4096, rope_kwargs=[{"second_per_grid_ts": s} for s in per_ex]
  )
  inputs = torch_inputs(cfg, examples, seq_len, second_per_grid_ts=flat)
  want, _ = model.model.get_rope_index(
    inputs["input_ids"],
    inputs["mm_token_type_ids"],
    inputs.get("image_grid_thw"),
    inputs.get("video_grid_thw"),
    second_per_grid_ts=inputs["second_per_grid_ts"],
    attention_mask=inputs["attention_mask"],
  )
  m = batch["attention_mask"].astype(bool)
  np.testing.assert_array_equal(batch["position_ids"][:, m], want.numpy()[:, m])
  # the videos' temporal ids really are spaced by tokens_per_second * seconds, not by 1
  ex = examples[-1]
  grids = np.asarray([thw for _, thw, _ in ex["items"]])
  unit_steps = fam.mrope_positions(
    ex["ids"], grids, cfg.image_token_id, cfg.video_token_id, cfg.merge_size
  )
  assert not np.array_equal(
    unit_steps, fam.rope_index(ex["ids"], grids, cfg, second_per_grid_ts=per_ex[-1])
  )


@pytest.mark.parametrize(
  "grids", [[(1, 8, 12)], [(1, 6, 10), (2, 4, 4), (1, 2, 2)], [(3, 16, 16), (1, 10, 14)]]
)
@pytest.mark.parametrize("window_size", [56, 112])
def test_window_index_matches_transformers(grids, window_size):
  from transformers.vision_utils import get_vision_window_index

  fam = get_family(FAMILY)
  idx, cu = fam.window_index(np.asarray(grids), 2, window_size, 14)
  t_idx, t_cu = get_vision_window_index(
    torch.tensor(grids), spatial_merge_size=2, window_size=window_size, patch_size=14
  )
  np.testing.assert_array_equal(idx, t_idx.numpy())
  np.testing.assert_array_equal(cu, t_cu.numpy())
  # the per-patch window ids partition the patches exactly as the reordered cu_window_seqlens do
  seg = fam.window_segment_ids(np.asarray(grids), 2, window_size, 14)
  order = (idx[:, None] * 4 + np.arange(4)).reshape(-1)
  reordered = seg[order]
  bounds = np.flatnonzero(np.diff(reordered)) + 1
  np.testing.assert_array_equal(np.concatenate([[0], bounds, [len(seg)]]), cu)


def test_legacy_key_names_load(hf_dirs, tmp_path):
  """An HF directory with the older hub names (`model.layers.*`, `visual.*`) loads to the same
  rewards."""
  fam = get_family(FAMILY)
  cfg, model, head, _ = hf_dirs[1]
  path = save_hf_dir(model, head, tmp_path / "legacy", legacy_names=True)
  ours = hf_io.load_hf(path)
  rng = np.random.default_rng(7)
  examples = [make_example(cfg, s, rng) for s in CASES["mixed_batch"]]
  per_ex, flat = _second_per_grid_ts(examples, rng)
  seq_len = max(len(e["ids"]) for e in examples)
  batch = jax_batch(
    fam, cfg, examples, seq_len, 512, rope_kwargs=[{"second_per_grid_ts": s} for s in per_ex]
  )
  _, t_rewards = torch_forward(
    model, head, torch_inputs(cfg, examples, seq_len, second_per_grid_ts=flat)
  )
  _, rewards = run_ours(ours, batch)
  np.testing.assert_allclose(rewards, t_rewards, atol=2e-3, rtol=0)


@pytest.mark.parametrize("preset", ["qwen2.5-vl-3b", "qwen2.5-vl-7b"])
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
  # the hub's flat layout: text keys at the top, rope in rope_scaling ("mrope"), `in_chans` in
  # vision_config
  want = fam.PRESETS["qwen2.5-vl-7b"]
  nested = want.to_hf()
  text = nested.pop("text_config")
  rope = text.pop("rope_parameters")
  vision = nested.pop("vision_config")
  vision["in_chans"] = vision.pop("in_channels")
  text.pop("model_type")
  flat = dict(
    nested,
    **text,
    vision_config=vision,
    rope_theta=rope["rope_theta"],
    rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
  )
  assert fam.Config.from_hf(flat) == want
  assert fam.Config.from_hf(transformers.AutoConfig.for_model(**flat).to_dict()) == want


def test_end_to_end_processor_and_loader(tmp_path):
  # frame lists carry no fps: transformers' processor then uses 24 fps, i.e. temporal_patch_size /
  # 24 s per grid
  end_to_end_check(FAMILY, tmp_path, seed=2, second_per_grid_ts=[2 / 24])
