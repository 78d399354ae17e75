"""HF checkpoint loading (both key schemes, sharded, value head) and export, against
transformers."""

import json
import shutil

import model_fixtures as mf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mrm_jax.errors import UserError
from mrm_jax.models import hf_io, load_reward_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("hfio") / "model"
  tmodel, head, tok = mf.save_tiny_qwen2_vl(d, seed=5)
  ids = tok(
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    add_special_tokens=False,
  )["input_ids"]
  batch = {
    "input_ids": np.asarray([ids], np.int32),
    "attention_mask": np.ones((1, len(ids)), np.int32),
  }
  ref_h, ref_r = mf.torch_hidden_and_rewards(tmodel, head, batch)
  return dict(dir=d, tmodel=tmodel, head=head, batch=batch, ref_h=ref_h, ref_r=ref_r)


def _jax_batch(b):
  t = b["input_ids"].shape[1]
  return {
    **b,
    "position_ids": np.broadcast_to(np.arange(t, dtype=np.int32), (3, 1, t)),
    "pixel_values": np.zeros((0, 1176), np.float32),
  }


def test_loads_transformers_checkpoint(hf_dir):
  model, _ = load_reward_model(hf_dir["dir"])
  h, r = model.hidden_and_rewards(_jax_batch(hf_dir["batch"]))
  np.testing.assert_allclose(np.asarray(h), hf_dir["ref_h"], atol=1e-4)
  np.testing.assert_allclose(np.asarray(r), hf_dir["ref_r"], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(model.v_head.kernel[...]).T, hf_dir["head"][0])


def _new_name(k):
  for old, new in (("model.", "model.language_model."), ("visual.", "model.visual.")):
    if k.startswith(old) and not k.startswith(new):
      return new + k[len(old) :]
  return k


@pytest.mark.parametrize("scheme", ["legacy", "current"])
def test_both_key_schemes_and_shards(hf_dir, tmp_path, scheme):
  legacy = tmp_path / scheme
  shutil.copytree(hf_dir["dir"], legacy)
  tensors = load_file(str(legacy / "model.safetensors"))
  rename = hf_io.legacy_name if scheme == "legacy" else _new_name
  renamed = {rename(k): v for k, v in tensors.items()}
  if scheme == "legacy":
    assert any(k.startswith("visual.") for k in renamed) and "model.embed_tokens.weight" in renamed
  else:
    assert any(k.startswith("model.visual.") for k in renamed)
    assert "model.language_model.embed_tokens.weight" in renamed
  (legacy / "model.safetensors").unlink()
  keys = sorted(renamed)
  half = len(keys) // 2
  save_file({k: renamed[k] for k in keys[:half]}, str(legacy / "model-00001-of-00002.safetensors"))
  save_file({k: renamed[k] for k in keys[half:]}, str(legacy / "model-00002-of-00002.safetensors"))
  index = {
    "weight_map": {
      k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)
    }
  }
  (legacy / "model.safetensors.index.json").write_text(json.dumps(index))
  model, _ = load_reward_model(legacy)
  np.testing.assert_allclose(
    np.asarray(model(_jax_batch(hf_dir["batch"]))), hf_dir["ref_r"], atol=1e-4
  )


def test_missing_value_head_gives_a_fresh_deterministic_head(hf_dir, tmp_path, caplog):
  d = tmp_path / "nohead"
  shutil.copytree(hf_dir["dir"], d)
  (d / "value_head.safetensors").unlink()
  m1, _ = load_reward_model(d)
  m2, _ = load_reward_model(d)
  assert "value head is freshly initialised" in caplog.text
  np.testing.assert_array_equal(
    np.asarray(m1.v_head.kernel[...]), np.asarray(m2.v_head.kernel[...])
  )


def test_errors_name_the_problem(hf_dir, tmp_path):
  with pytest.raises(UserError, match="no config.json"):
    load_reward_model(tmp_path)
  d = tmp_path / "m"
  shutil.copytree(hf_dir["dir"], d)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
  with pytest.raises(UserError, match="unknown model_type 'llava'"):
    load_reward_model(d)
  cfg["text_config"]["intermediate_size"] = 96
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(
    UserError,
    match=r"model\.safetensors: tensor "
    r"'model\.(language_model\.)?layers\.0\.mlp\.gate_proj\.weight' has shape \[128, 64\], "
    r"expected \[96, 64\]",
  ):
    load_reward_model(d)
  shutil.copy(hf_dir["dir"] / "config.json", d / "config.json")
  save_file(
    {
      "v_head.summary.weight": np.zeros((1, 3), np.float32),
      "v_head.summary.bias": np.zeros(1, np.float32),
    },
    str(d / "value_head.safetensors"),
  )
  with pytest.raises(UserError, match=r"v_head\.summary\.weight' has shape \[1, 3\]"):
    load_reward_model(d)
  (d / "model.safetensors").unlink()
  with pytest.raises(UserError, match="no model weights"):
    load_reward_model(d)


def test_export_loads_in_transformers_and_back(hf_dir, tmp_path):
  from transformers import Qwen2VLForConditionalGeneration

  model, _ = load_reward_model(hf_dir["dir"])
  out = hf_io.export_hf(model, tmp_path / "export", source_dir=hf_dir["dir"])
  assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
  head = load_file(str(out / "value_head.safetensors"))
  np.testing.assert_array_equal(head["v_head.summary.weight"], hf_dir["head"][0])
  t, info = Qwen2VLForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
  t.eval()
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  base = load_file(str(hf_dir["dir"] / "model.safetensors"))
  np.testing.assert_array_equal(
    t.lm_head.weight.detach().numpy(), base["lm_head.weight"]
  )  # carried over
  h, r = mf.torch_hidden_and_rewards(
    t, (head["v_head.summary.weight"], head["v_head.summary.bias"]), hf_dir["batch"]
  )
  np.testing.assert_allclose(h, hf_dir["ref_h"], atol=1e-5)
  np.testing.assert_allclose(r, hf_dir["ref_r"], atol=1e-5)
  back, _ = load_reward_model(out)
  np.testing.assert_allclose(
    np.asarray(back(_jax_batch(hf_dir["batch"]))), hf_dir["ref_r"], atol=1e-4
  )
  # sharded export with an index
  out2 = hf_io.export_hf(
    model, tmp_path / "sharded", max_shard_bytes=200_000, source_dir=hf_dir["dir"]
  )
  assert (out2 / "model.safetensors.index.json").is_file() and not (
    out2 / "model.safetensors"
  ).exists()
  assert (
    "lm_head.weight"
    in json.loads((out2 / "model.safetensors.index.json").read_text())["weight_map"]
  )
  again, _ = load_reward_model(out2)
  np.testing.assert_allclose(
    np.asarray(again(_jax_batch(hf_dir["batch"]))), hf_dir["ref_r"], atol=1e-4
  )
