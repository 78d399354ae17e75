"""`evaluate --model` and `best-of-n` end to end on a tiny Qwen2-VL reward model saved by
transformers, against the PyTorch model scoring each hand-built record on its own (the oracle):
benchmark items → (chosen, rejected) records with the reward-model system prompt, images or video
frames; missing images are an error or, with --skip-missing, counted per category."""

import json

import model_fixtures as mf
import numpy as np
import pytest
from PIL import Image

from mrm_jax import cli
from mrm_jax.data.records import REWARD_SYSTEM_PROMPT

torch = pytest.importorskip("torch")

TOL = 1e-4


def _image(path, w, h, seed):
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _torch_reward(setup, record):
  """The oracle: transformers' model + value head on one record, encoded on its own."""
  e = setup["proc"].encode(record, setup["root"], max_len=4096)
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
  _, r = mf.torch_hidden_and_rewards(setup["tmodel"], setup["head"], batch)
  return float(r[0])


ANSWERS = [
  "A red circle.",
  "A blue square near the top left corner.",
  "The answer is yes.",
  "No.",
  "The cat sits on the mat.",
  "Image 2 is better.",
  "Describe the picture in detail.",
  "0123",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("evalmodel")
  tmodel, head, _ = mf.save_tiny_qwen2_vl(d / "model", seed=3)
  from mrm_jax.models import load_reward_model

  _, proc = load_reward_model(d / "model")
  root = d / "bench"
  _image(root / "mcq" / "1.png", 40, 60, 1)
  _image(root / "long" / "2.png", 80, 50, 2)
  _image(root / "safety" / "3.png", 56, 56, 3)
  for k, name in enumerate(("frame_10.jpg", "frame_2.jpg", "frame_1.jpg")):
    _image(root / "video" / "clip" / name, 60, 44, 10 + k)
  rows = [
    ("a", "mcq/1.png", None),
    ("a", "mcq/1.png", None),
    ("b", "long/2.png", None),
    ("c", None, "video/clip"),
    ("d", "safety/3.png", None),
    ("e", "short/missing.png", None),
  ]
  recs = []
  for k, (rid, image, video) in enumerate(rows):
    rec = {
      "id": rid,
      "prompt": f"What is in the image? {k}",
      "chosen": ANSWERS[k],
      "rejected": ANSWERS[k + 1],
      "chosen_reason": "",
      "rejected_reason": "",
    }
    rec.update({"image": image} if image else {"video": video})
    recs.append(rec)
  data = root / "mm_reward_bench.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in recs))
  return dict(
    d=d, model=d / "model", tmodel=tmodel, head=head, proc=proc, root=root, data=data, recs=recs
  )


def test_evaluate_model_matches_torch_oracle(setup, capsys):
  out = setup["d"] / "report.json"
  args = [
    "evaluate",
    "--benchmark",
    "mm_rlhf_rewardbench",
    "--data",
    str(setup["data"]),
    "--model",
    str(setup["model"]),
    "--image-root",
    str(setup["root"]),
    "--batch-size",
    "3",
    "--output",
    str(out),
  ]
  # The missing image is an error naming it ...
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert "1 image files missing" in err and "mm_reward_bench.jsonl:6: short/missing.png" in err
  assert "--skip-missing" in err and not out.exists()
  # ... and with --skip-missing the rest is evaluated and the skip counted per category.
  assert cli.main(args + ["--skip-missing"]) == 0
  report = json.loads(out.read_text())

  right, cats, ids = [], {}, {}
  for rec in setup["recs"][:5]:
    chosen, rejected = _expected_records(rec)
    c, r = _torch_reward(setup, chosen), _torch_reward(setup, rejected)
    assert abs(c - r) > 10 * TOL  # no near-ties: the comparison is the same in both implementations
    cat = (rec.get("image") or rec.get("video")).split("/")[0]
    right.append(c > r)
    cats.setdefault(cat, []).append(c > r)
    ids.setdefault(rec["id"], []).append(c > r)
  assert report["n"] == 5 and report["acc"] == pytest.approx(sum(right) / 5)
  assert report["acc_plus"] == pytest.approx(sum(all(v) for v in ids.values()) / len(ids))
  assert {k: (v["n"], v["acc"]) for k, v in report["categories"].items()} == {
    k: (len(v), pytest.approx(sum(v) / len(v))) for k, v in cats.items()
  }
  assert report["skipped"] == {"n": 1, "categories": {"short": 1}}
  assert "skipped" in capsys.readouterr().out


def _expected_records(rec):
  """The (chosen, rejected) scoring records an MM-RLHF-RewardBench line should become, by hand."""
  frames = ["video/clip/frame_1.jpg", "video/clip/frame_2.jpg", "video/clip/frame_10.jpg"]
  media = {"images": [rec["image"]]} if "image" in rec else {"images": [], "videos": [frames]}
  base = {**media, "question": rec["prompt"], "system": REWARD_SYSTEM_PROMPT}
  return {**base, "answer": rec["chosen"]}, {**base, "answer": rec["rejected"]}


def test_score_items_match_torch_oracle(setup):
  from mrm_jax.evaluate import benchmarks
  from mrm_jax.evaluate.model_eval import score_items
  from mrm_jax.models import load_reward_model

  items = benchmarks.load("mm_rlhf_rewardbench", setup["data"])[:5]
  model, proc = load_reward_model(setup["model"])
  got = score_items(items, setup["root"], model, proc, batch_size=4)
  for rec, (c, r) in zip(setup["recs"], got):
    chosen, rejected = _expected_records(rec)
    assert c == pytest.approx(_torch_reward(setup, chosen), abs=TOL)
    assert r == pytest.approx(_torch_reward(setup, rejected), abs=TOL)


def test_best_of_n_command_matches_torch_oracle(setup, capsys):
  cands = [
    {
      "id": "x",
      "images": ["mcq/1.png"],
      "question": "What is in the image?",
      "responses": ANSWERS[:4],
    },
    {
      "id": "y",
      "images": ["long/2.png", "safety/3.png"],
      "question": "Image 1: <image> Image 2: <image> Which?",
      "responses": ANSWERS[4:7],
      "models": ["m1", "m2", "m3"],
    },
  ]
  inp = setup["root"] / "cands.jsonl"
  inp.write_text("".join(json.dumps(c) + "\n" for c in cands))
  out = setup["d"] / "bon.jsonl"
  assert (
    cli.main(
      [
        "best-of-n",
        "--model",
        str(setup["model"]),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--batch-size",
        "3",
      ]
    )
    == 0
  )
  got = [json.loads(l) for l in out.read_text().splitlines()]
  for cand, res in zip(cands, got):
    want = [
      _torch_reward(
        setup,
        {
          "images": cand["images"],
          "question": cand["question"],
          "system": REWARD_SYSTEM_PROMPT,
          "answer": a,
        },
      )
      for a in cand["responses"]
    ]
    assert res["scores"] == pytest.approx(want, abs=TOL)
    best = int(np.argmax(want))
    assert sorted(want)[-1] - sorted(want)[-2] > 10 * TOL
    assert res["best"] == best and res["best_response"] == cand["responses"][best]
    assert {k: res[k] for k in cand} == cand


def test_parquet_release_with_embedded_images(setup, tmp_path, capsys):
  """VL-RewardBench's Hugging Face release embeds the images (parquet `{bytes, path}`): they are
  extracted for the run, and `human_ranking` [1, 0] makes response 1 the chosen one."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  png = (setup["root"] / "mcq" / "1.png").read_bytes()
  rows = [
    {
      "id": "RLAIF-V-1",
      "query": "What is in the image?",
      "response": [ANSWERS[0], ANSWERS[1]],
      "human_ranking": [1, 0],
      "image": {"bytes": png, "path": "x.png"},
    },
    {
      "id": "mathverse_2",
      "query": "How many?",
      "response": [ANSWERS[2], ANSWERS[3]],
      "human_ranking": [0, 1],
      "image": {"bytes": png, "path": "x.png"},
    },
  ]
  data = tmp_path / "vlrb.parquet"
  pq.write_table(pa.Table.from_pylist(rows), data)
  out = tmp_path / "report.json"
  assert (
    cli.main(
      [
        "evaluate",
        "--benchmark",
        "vl_rewardbench",
        "--data",
        str(data),
        "--model",
        str(setup["model"]),
        "--output",
        str(out),
      ]
    )
    == 0
  )
  report = json.loads(out.read_text())
  rights = []
  for row in rows:
    best = row["human_ranking"].index(0)
    base = {"images": ["mcq/1.png"], "question": row["query"], "system": REWARD_SYSTEM_PROMPT}
    rights.append(
      _torch_reward(setup, {**base, "answer": row["response"][best]})
      > _torch_reward(setup, {**base, "answer": row["response"][1 - best]})
    )
  assert report == {
    "n": 2,
    "overall": sum(rights) / 2,
    "macro": sum(rights) / 2,
    "general": None,
    "hallucination": float(rights[0]),
    "reasoning": float(rights[1]),
  }
