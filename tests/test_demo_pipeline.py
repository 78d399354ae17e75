"""`mrm-jax demo` end to end on a small world (DESIGN §3.1c): summary.json's contract keys, each
number recomputed by hand from the files the run leaves, valid PNG plots, the closing table, and
resumption.

The run is interrupted once (an injected fault in curation round 0's judge stage), finished by a
second call, then rerun through the command line: the rerun must redo nothing and write the same
summary apart from `seconds`. The world's model is shrunk to hidden size 32 and trained 4 steps per
round on one device; JAX's persistent compilation cache (a temporary directory) turns every compile
after the first into a disk read.
"""

import json
import os
import re
from pathlib import Path

import jax
import pytest
from PIL import Image

from mrm_jax.cli import main
from mrm_jax.demo import curation as loop
from mrm_jax.demo.config import load_demo_config
from mrm_jax.demo.pipeline import run_demo
from mrm_jax.demo.world import ensure_world
from mrm_jax.errors import UserError

CONTRACT = (
  "round0_heldout_accuracy",
  "heldout_accuracy",
  "noise_precision",
  "noise_recall",
  "seconds",
)
OVERRIDES = [
  f"--config.{k}={v}"
  for k, v in {
    "world.n_candidates": 10,
    "world.n_t2i": 6,
    "world.n_noisy": 30,
    "world.n_heldout": 12,
    "world.flip_fraction": 0.3,
    "curate.rounds": 1,
    "curate.score.batch_size": 8,
    "train.num_epochs": 0,
    "train.num_steps": 4,
    "train.batch_size": 4,
    "train.checkpoint_every": 2,
    "train.log_every": 2,
    "train.tensorboard": False,
    "data.seq_buckets": "(128,)",
    "data.num_workers": 1,
  }.items()
]
ARGS = ["--size", "small", "--seed", "3"]


def _jsonl(path):
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, compile_cache):
  wd = tmp_path_factory.mktemp("demo")
  cfg = load_demo_config("curate_demo", OVERRIDES, seed=3, size="small")
  world, _, reused = ensure_world(wd, cfg)
  assert not reused
  c = json.loads((world / "model" / "config.json").read_text())
  c["text_config"].update(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
  )
  c["vision_config"].update(embed_dim=32, hidden_size=32, num_heads=2)
  (world / "model" / "config.json").write_text(json.dumps(c))

  def go(out):
    return run_demo(
      wd,
      size="small",
      seed=3,
      overrides=OVERRIDES,
      progress=False,
      devices=jax.devices()[:1],
      out=out,
    )

  os.environ[loop.FAULT_ENV] = "round_0/judge@3"
  try:
    with pytest.raises(loop.InjectedFault):
      go(lambda line: None)
  finally:
    del os.environ[loop.FAULT_ENV]
  assert not (wd / "summary.json").exists()
  lines = []
  summary = go(lines.append)
  return wd, summary, lines


def test_summary_has_the_contract_keys(demo):
  wd, summary, lines = demo
  on_disk = json.loads((wd / "summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  for k in CONTRACT[:-1]:
    assert isinstance(on_disk[k], float) and 0.0 <= on_disk[k] <= 1.0, (k, on_disk[k])
  assert isinstance(on_disk["seconds"], float) and on_disk["seconds"] > 0
  assert 0 < on_disk["compute_seconds"]
  # the interrupted run was resumed, not redone
  assert "[prepare] done earlier" in "\n".join(lines) and "[base/train] done earlier" in "\n".join(
    lines
  )
  assert "[round_0/judge] queued" in "\n".join(lines)
  for t in range(2):
    assert any(
      line.startswith(f"[heldout/round_{t}] model ") and line.endswith(" s)") for line in lines
    )


def test_heldout_accuracies_recomputed_from_the_scores(demo):
  """Two trainings (round 0 before curation, round 1 after), each scored on every held-out pair."""
  wd, summary, _ = demo
  heldout = _jsonl(wd / "world" / "heldout_pairs.jsonl")
  assert summary["heldout_pairs"] == len(heldout) == 12
  accs = []
  for t, model in enumerate(["base/train/run", "round_0/train/run"]):
    rr = summary["rounds"][t]
    assert rr["round"] == t and rr["model"] == model and rr["train_steps"] == 4
    scores = _jsonl(wd / rr["heldout_scores"])
    assert [s["id"] for s in scores] == [p["id"] for p in heldout]
    right = sum(s["chosen"] > s["rejected"] for s in scores)
    accs.append(right / len(heldout))
    assert rr["heldout_accuracy"] == pytest.approx(accs[-1], abs=1e-12)
    # the training loop's own eval of the same split agrees
    assert rr["training_eval_accuracy"] == pytest.approx(accs[-1], abs=1e-6)
  assert summary["round0_heldout_accuracy"] == pytest.approx(accs[0], abs=1e-12)
  assert summary["heldout_accuracy"] == pytest.approx(accs[-1], abs=1e-12)
  assert summary["heldout_accuracy_per_round"] == [r["heldout_accuracy"] for r in summary["rounds"]]


def test_noise_precision_and_recall_recomputed_from_the_truth(demo):
  wd, summary, _ = demo
  truth = json.loads((wd / "world" / "noisy_truth.json").read_text())
  noisy = _jsonl(wd / "world" / "noisy_pairs.jsonl")
  final = {p["id"]: p for p in _jsonl(wd / summary["curated"])}
  wrong = {p["id"] for p in noisy if p["chosen"] != truth["correct_answer"][p["id"]]}
  assert wrong == set(truth["flipped_ids"]) and len(wrong) == 9
  found = {p["id"] for p in noisy if p["id"] in final and final[p["id"]]["chosen"] != p["chosen"]}
  assert summary["mislabelled"] == len(wrong) and summary["found"] == len(found)
  assert summary["noise_precision"] == round(len(found & wrong) / len(found), 4)
  assert summary["noise_recall"] == round(len(found & wrong) / len(wrong), 4)
  assert summary["curated_pairs"] == len(final)


def test_plots_are_pngs_beside_the_summary(demo):
  wd, summary, _ = demo
  assert summary["plots"][0] == "heldout_accuracy.png"
  assert {"curation_counts.png", "strength_round_0.png"} <= set(summary["plots"])
  for name in summary["plots"]:
    path = wd / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with Image.open(path) as im:
      im.verify()
    with Image.open(path) as im:
      assert im.size[0] > 200 and im.size[1] > 200


def test_rerun_resumes_and_prints_the_table(demo, capsys):
  wd, summary, _ = demo
  stamp = {p: p.stat().st_mtime_ns for p in (wd / "heldout").iterdir()}
  assert main(["demo", "--workdir", str(wd), *ARGS, "--no-progress", *OVERRIDES]) == 0
  out = capsys.readouterr().out
  for stage in ("prepare", "base/train", "round_0/score", "round_0/train", "round_0/merge"):
    assert f"[{stage}] done earlier" in out
  # the table: one row per training round, the noise figures, the plots
  for label, key in (
    ("held-out accuracy, round 0", "round0_heldout_accuracy"),
    ("held-out accuracy, round 1", "heldout_accuracy"),
    ("noise precision", "noise_precision"),
    ("noise recall", "noise_recall"),
  ):
    assert re.search(rf"^{label} +{summary[key]:.3f}  ", out, re.M), (label, out)
  assert re.search(r"^plots +3  heldout_accuracy.png", out, re.M)
  again = json.loads((wd / "summary.json").read_text())
  assert again["seconds"] < summary["seconds"]
  assert {k: v for k, v in again.items() if k != "seconds"} == {
    k: v for k, v in json.loads(json.dumps(summary)).items() if k != "seconds"
  }
  assert {p: p.stat().st_mtime_ns for p in (wd / "heldout").iterdir()} == stamp  # nothing rescored


def test_a_world_without_heldout_pairs_is_refused_before_any_work(tmp_path):
  wd = tmp_path / "w"
  with pytest.raises(UserError, match="world.n_heldout must be at least 1"):
    run_demo(wd, size="small", overrides=["--config.world.n_heldout=0"], progress=False)
  assert not wd.exists()
