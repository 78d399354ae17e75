"""Qwen2-VL reward model vs transformers' PyTorch Qwen2-VL (float32, tiny random weights)."""

import dataclasses

import jax
import jax.numpy as jnp
import model_fixtures as mf
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mrm_jax.models import common, create_reward_model, load_reward_model, qwen2_vl
from mrm_jax.models.reward import last_token_index

torch = pytest.importorskip("torch")

TOL = 1e-4
_forward = jax.jit(lambda m, b: m.hidden_and_rewards(b))


def _image(path, w, h, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
  return path.name


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def setup(request, tmp_path_factory):
  seed = request.param
  d = tmp_path_factory.mktemp(f"qwen2vl_{seed}")
  tmodel, head, _ = mf.save_tiny_qwen2_vl(d / "model", seed=seed)
  img = d / "img"
  img.mkdir()
  names = {
    "a": _image(img / "a.png", 37, 53, seed),
    "b": _image(img / "b.png", 300, 97, seed + 1),
    "c": _image(img / "c.png", 64, 64, seed + 2),
  }
  frames = [_image(img / f"f{i}.png", 60, 44, seed + 10 + i) for i in range(3)]
  model, proc = load_reward_model(d / "model")
  long_q = " ".join(["Describe the picture in detail."] * 60)
  records = {
    "one_image": {
      "images": [names["a"]],
      "question": "What is in the image?",
      "answer": "A red circle.",
    },
    "multi_image": {
      "images": [names["a"], names["b"], names["c"]],
      "question": "Image 1: <image> Image 2: <image> and <image> Which is better?",
      "answer": "Image 2 is better.",
      "system": "You are a judge.",
    },
    "video": {"videos": [frames], "question": "<video>What happens?", "answer": "The cat sits."},
    "no_image": {"question": "What is 2 + 2?", "answer": "The answer is 4."},
    "long_prompt": {"images": [names["c"]], "question": long_q, "answer": "Yes."},
  }
  enc = {k: proc.encode(r, img, max_len=4096) for k, r in records.items()}
  # one static shape for every single-example check: one compilation, and padding is exercised
  # everywhere
  seq = max(e.length for e in enc.values()) + 3
  budget = max(e.num_patches for e in enc.values()) + 4
  return dict(
    seq=seq,
    budget=budget,
    tmodel=tmodel,
    head=head,
    model=model,
    proc=proc,
    enc=enc,
    records=records,
    img=img,
  )


def _torch_inputs(e):
  batch = {"input_ids": e.input_ids[None], "attention_mask": np.ones((1, e.length), np.int64)}
  sizes = np.prod(e.grid_thw, axis=1) if len(e.grid_thw) else []
  chunks = np.split(e.pixel_values, np.cumsum(sizes)[:-1]) if len(sizes) else []
  for kind, pv, gk in (
    ("image", "pixel_values", "image_grid_thw"),
    ("video", "pixel_values_videos", "video_grid_thw"),
  ):
    sel = [i for i, k in enumerate(e.vision_kinds) if k == kind]
    if sel:
      batch[pv] = np.concatenate([chunks[i] for i in sel])
      batch[gk] = e.grid_thw[sel]
  return batch


@pytest.mark.parametrize("case", ["one_image", "multi_image", "video", "no_image", "long_prompt"])
def test_single_example_matches_torch(setup, case):
  e = setup["enc"][case]
  ref_h, ref_r = mf.torch_hidden_and_rewards(setup["tmodel"], setup["head"], _torch_inputs(e))
  batch = setup["proc"].collate([e], seq_len=setup["seq"], patch_budget=setup["budget"])
  hidden, rewards = _forward(setup["model"], batch)
  hidden = np.asarray(hidden)[:, : e.length]
  np.testing.assert_allclose(np.asarray(hidden)[0], ref_h[0], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(rewards), ref_r, atol=TOL, rtol=0)
  assert rewards.dtype == jnp.float32 and rewards.shape == (1,)


def test_padded_mixed_batch_matches_torch(setup):
  names = ["no_image", "multi_image", "video", "one_image", "long_prompt"]
  encs = [setup["enc"][n] for n in names]
  seq_len = max(e.length for e in encs) + 7
  budget = sum(e.num_patches for e in encs) + 8  # padded patches too
  batch = setup["proc"].collate(encs, seq_len=seq_len, patch_budget=budget)
  hidden, rewards = _forward(setup["model"], batch)
  for i, e in enumerate(encs):
    ref_h, ref_r = mf.torch_hidden_and_rewards(setup["tmodel"], setup["head"], _torch_inputs(e))
    np.testing.assert_allclose(
      np.asarray(hidden)[i, : e.length], ref_h[0], atol=TOL, rtol=0, err_msg=names[i]
    )
    np.testing.assert_allclose(np.asarray(rewards)[i], ref_r[0], atol=TOL, rtol=0, err_msg=names[i])


def test_left_padding_gives_same_reward(setup):
  e = setup["enc"]["no_image"]
  right = setup["proc"].collate([e], seq_len=e.length + 5)
  left = {k: v.copy() for k, v in right.items()}
  for k in ("input_ids", "attention_mask"):
    left[k] = np.roll(right[k], 5, axis=-1)
  left["position_ids"] = np.roll(right["position_ids"], 5, axis=-1)
  m = setup["model"]
  np.testing.assert_allclose(
    np.asarray(_forward(m, left)[1]), np.asarray(_forward(m, right)[1]), atol=1e-5
  )
  assert int(last_token_index(jnp.asarray(left["attention_mask"]))[0]) == e.length + 4


def test_rope_index_matches_torch(setup):
  tmodel = setup["tmodel"]
  for name in ("multi_image", "video"):
    e = setup["enc"][name]
    ids = torch.as_tensor(e.input_ids[None], dtype=torch.long)
    mm = (ids == tmodel.config.image_token_id).long() + 2 * (
      ids == tmodel.config.video_token_id
    ).long()
    tb = _torch_inputs(e)
    pos, _ = tmodel.model.get_rope_index(
      ids,
      mm,
      image_grid_thw=torch.as_tensor(tb["image_grid_thw"]) if "image_grid_thw" in tb else None,
      video_grid_thw=torch.as_tensor(tb["video_grid_thw"]) if "video_grid_thw" in tb else None,
    )
    np.testing.assert_array_equal(e.position_ids, pos[:, 0].numpy())


@pytest.mark.parametrize("preset", ["qwen2-vl-2b", "qwen2-vl-7b"])
def test_preset_parameter_count_matches_transformers(preset):
  from transformers import Qwen2VLConfig, Qwen2VLModel

  cfg = qwen2_vl.PRESETS[preset]
  with common.abstract_params():
    abstract = qwen2_vl.Backbone(cfg, rngs=nnx.Rngs(0))
  ours = common.count_params(abstract)
  with torch.device("meta"):
    ref = Qwen2VLModel(Qwen2VLConfig(**cfg.to_hf()))
  theirs = sum(p.numel() for p in ref.parameters())
  assert ours == theirs
  # every HF tensor has exactly one place in our model
  keys = [k for k, _, _ in qwen2_vl.hf_param_map(cfg)]
  assert sorted("model." + k for k, _ in ref.named_parameters()) == sorted(keys)


def test_params_carry_logical_axes():
  m = create_reward_model("qwen2_vl", "tiny", nnx.Rngs(0))
  q = m.backbone.language_model.layers[0].self_attn.q_proj.kernel
  assert q.get_metadata()["out_sharding"] == ("embed", "heads")
  assert m.backbone.language_model.embed_tokens.embedding.get_metadata()["out_sharding"] == (
    "vocab",
    "embed",
  )
  assert m.backbone.visual.blocks[0].mlp.fc1.kernel.get_metadata()["out_sharding"] == (
    "vision_embed",
    "vision_mlp",
  )


def test_abstract_params_match_eval_shape():
  cfg = qwen2_vl.PRESETS["tiny"]
  a = nnx.eval_shape(lambda: create_reward_model("qwen2_vl", cfg, nnx.Rngs(0)))
  with common.abstract_params():
    b = create_reward_model("qwen2_vl", cfg, nnx.Rngs(0))
  fa, fb = nnx.to_flat_state(nnx.state(a, nnx.Param)), nnx.to_flat_state(nnx.state(b, nnx.Param))
  assert [(k, v.get_value().shape, v.get_metadata()["out_sharding"]) for k, v in fa] == [
    (k, v.get_value().shape, v.get_metadata()["out_sharding"]) for k, v in fb
  ]


def test_bfloat16_compute_close_to_float32():
  cfg = dataclasses.replace(qwen2_vl.PRESETS["tiny"], image_token_id=500, video_token_id=501)
  m32 = create_reward_model("qwen2_vl", cfg, nnx.Rngs(3))
  bf = create_reward_model("qwen2_vl", cfg, nnx.Rngs(3), dtype="bfloat16")
  ids = np.arange(1, 21, dtype=np.int32)[None]
  batch = {
    "input_ids": ids,
    "attention_mask": np.ones_like(ids),
    "position_ids": np.broadcast_to(np.arange(20), (3, 1, 20)),
    "pixel_values": np.zeros((0, cfg.vision.patch_dim), np.float32),
  }
  h32, r32 = _forward(m32, batch)
  h16, r16 = _forward(bf, batch)
  assert h16.dtype == jnp.bfloat16 and r16.dtype == jnp.float32
  assert np.isfinite(np.asarray(r16)).all()
  np.testing.assert_allclose(np.asarray(r16), np.asarray(r32), atol=0.05 * (1 + abs(float(r32[0]))))
