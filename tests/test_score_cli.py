"""`mrm-jax score` end to end on an HF directory saved by transformers (+ LLaMA-Factory value
head)."""

import json
import shutil

import model_fixtures as mf
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from mrm_jax import cli
from mrm_jax.models import hf_io, load_reward_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("score")
  tmodel, head, _ = mf.save_tiny_qwen2_vl(root / "model", seed=7)
  data = root / "data"
  (data / "imgs").mkdir(parents=True)
  rng = np.random.default_rng(7)
  for name, (w, h) in {"a.png": (37, 53), "b.png": (300, 97)}.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(data / "imgs" / name)
  records = [
    {"id": "r1", "images": ["imgs/a.png"], "question": "What is shown?", "answer": "A red circle."},
    {
      "id": "r2",
      "images": [],
      "question": "What is 2 + 2?",
      "answer": "The answer is 4.",
      "extra": {"k": 1},
    },
    {
      "id": "r3",
      "images": ["imgs/a.png", "imgs/b.png"],
      "question": "Image 1: <image> Image 2: <image> Better?",
      "answer": "Image 2 is better.",
      "system": "You are a judge.",
    },
    {"id": "r4", "image": "imgs/b.png", "question": "Describe " * 30, "answer": "No."},
    {"id": "r5", "images": [], "question": "Hi", "answer": "Hello!"},
  ]
  inp = data / "in.jsonl"
  inp.write_text("".join(json.dumps(r) + "\n" for r in records))
  # the oracle: transformers' PyTorch model on the same encoded inputs, value head at the last token
  _, proc = load_reward_model(root / "model")
  ref = []
  from mrm_jax.data.records import normalize_scoring

  for r in records:
    e = proc.encode(normalize_scoring(r), data, 4096)
    b = {"input_ids": e.input_ids[None], "attention_mask": np.ones((1, e.length), np.int64)}
    if e.num_patches:
      b["pixel_values"], b["image_grid_thw"] = e.pixel_values, e.grid_thw
    ref.append(float(mf.torch_hidden_and_rewards(tmodel, head, b)[1][0]))
  return dict(root=root, model=root / "model", inp=inp, records=records, ref=np.asarray(ref))


def _score(world, model, out, *extra):
  return cli.main(
    [
      "score",
      "--model",
      str(model),
      "--input",
      str(world["inp"]),
      "--output",
      str(out),
      "--batch-size",
      "2",
      *extra,
    ]
  )


def test_scores_match_pytorch_and_keep_order(world, tmp_path):
  out = tmp_path / "out.jsonl"
  assert _score(world, world["model"], out) == 0
  lines = [json.loads(x) for x in out.read_text().splitlines()]
  assert [{k: v for k, v in r.items() if k != "score"} for r in lines] == world["records"]
  np.testing.assert_allclose([r["score"] for r in lines], world["ref"], atol=2e-3, rtol=0)
  assert len(set(np.round(world["ref"], 4))) == len(
    lines
  )  # distinct rewards: order is really checked


def test_older_key_names_score_the_same(world, tmp_path):
  d = tmp_path / "legacy"
  shutil.copytree(world["model"], d)
  tensors = load_file(str(d / "model.safetensors"))
  flipped = {
    (
      hf_io.legacy_name(k)
      if k.startswith("model.language_model.") or k.startswith("model.visual.")
      else (
        "model.language_model." + k[6:]
        if k.startswith("model.")
        else "model.visual." + k[7:]
        if k.startswith("visual.")
        else k
      )
    ): v
    for k, v in tensors.items()
  }
  assert set(flipped) != set(tensors)
  save_file(flipped, str(d / "model.safetensors"))
  out = tmp_path / "out.jsonl"
  assert _score(world, d, out) == 0
  np.testing.assert_allclose(
    [json.loads(x)["score"] for x in out.read_text().splitlines()], world["ref"], atol=2e-3
  )


def test_bfloat16_scoring_runs(world, tmp_path):
  out = tmp_path / "bf16.jsonl"
  assert _score(world, world["model"], out, "--dtype", "bfloat16") == 0
  scores = np.asarray([json.loads(x)["score"] for x in out.read_text().splitlines()])
  assert np.isfinite(scores).all()
  np.testing.assert_allclose(scores, world["ref"], atol=0.1 * (1 + np.abs(world["ref"]).max()))


def test_errors(world, tmp_path, capsys):
  out = tmp_path / "out.jsonl"
  assert (
    _score(world, world["model"], out, "--image-root", str(tmp_path)) == 2
  )  # images not under that root
  err = capsys.readouterr().err
  assert "in.jsonl:1: image 'imgs/a.png'" in err and "not found" in err
  assert not out.exists()
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"images": ["../../x.png"], "question": "q", "answer": "a"}) + "\n")
  assert (
    cli.main(["score", "--model", str(world["model"]), "--input", str(bad), "--output", str(out)])
    == 2
  )
  assert "bad.jsonl:1: image '../../x.png' is outside the image root" in capsys.readouterr().err
  assert not out.exists()
  assert (
    cli.main(
      [
        "score",
        "--model",
        str(world["model"]),
        "--input",
        str(tmp_path / "nope.jsonl"),
        "--output",
        str(out),
      ]
    )
    == 2
  )
  assert "nope.jsonl: no such file" in capsys.readouterr().err
  d = tmp_path / "m"
  shutil.copytree(world["model"], d)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mystery"}))
  assert _score(world, d, out) == 2
  assert "unknown model_type 'mystery'" in capsys.readouterr().err
  cfg["text_config"]["hidden_size"] = 32
  cfg["vision_config"]["hidden_size"] = 32
  cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 1, 1]
  (d / "config.json").write_text(json.dumps(cfg))
  assert _score(world, d, out) == 2
  assert "has shape" in capsys.readouterr().err
  (d / "model.safetensors").unlink()
  assert _score(world, d, out) == 2
  assert "no model weights" in capsys.readouterr().err
  assert not out.exists()


def test_export_cli_roundtrip(world, tmp_path):
  out_dir = tmp_path / "exported"
  assert cli.main(["export", "--checkpoint", str(world["model"]), "--output", str(out_dir)]) == 0
  out = tmp_path / "out.jsonl"
  assert _score(world, out_dir, out) == 0
  np.testing.assert_allclose(
    [json.loads(x)["score"] for x in out.read_text().splitlines()], world["ref"], atol=2e-3
  )
