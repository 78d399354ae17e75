"""`curate run` (DESIGN §9) on a tiny embedded world: stage outputs and manifests, report counts
recomputed by hand from the stage files, and resumption: a run failed in every stage in turn (one of
them a real SIGKILL of a subprocess) ends with outputs identical to an uninterrupted run.

The model is the world's Qwen2-VL shrunk to hidden size 32, trained 4 steps per round; training runs
on one device. JAX's persistent compilation cache (a temporary directory, shared with the
subprocess) makes every compile after the first a disk read: each round retrains with the same
shapes.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from mrm_jax.config import load_config
from mrm_jax.data.records import score_key
from mrm_jax.demo import curation as loop
from mrm_jax.errors import UserError

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "curate_demo.py")
STAGES = ["prepare", "base/train"] + [f"round_{r}/{s}" for r in range(2) for s in loop.ROUND_STAGES]


def _jsonl(path):
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _overrides(world: Path) -> list[str]:
  o = {
    "curate.world_dir": world,
    "curate.rounds": 2,
    "curate.score.batch_size": 8,
    "curate.flip_fraction": 0.5,
    "curate.min_votes": 2,
    "train.num_epochs": 0,
    "train.num_steps": 4,
    "train.learning_rate": 2e-3,
    "train.batch_size": 4,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 3,
    "train.log_every": 1,
    "train.tensorboard": False,
    "data.max_seq_len": 128,
    "data.seq_buckets": "(128,)",  # one static shape: one train-step compile
    "data.num_workers": 2,
  }
  # The training settings are pinned here, not taken from configs/demo.py: which pairs round 0
  # queues (the hand-vote fixture needs at least four) depends on them.
  return [f"--config.{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  from mrm_jax.demo.world import generate_world

  root = tmp_path_factory.mktemp("curate_world")
  cfg = load_config(CONFIG)
  cfg.world.n_candidates, cfg.world.n_t2i, cfg.world.n_noisy, cfg.world.n_heldout = 8, 4, 20, 0
  generate_world(root, cfg)
  c = json.loads((root / "model" / "config.json").read_text())
  c["text_config"].update(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
  )
  c["vision_config"].update(embed_dim=32, hidden_size=32, num_heads=2)
  (root / "model" / "config.json").write_text(json.dumps(c))
  return root


def _cfg(world, *extra):
  return load_config(CONFIG, _overrides(world) + list(extra))


def _run(world, workdir, *extra, out=None):
  lines = []
  report = loop.run_curation(
    _cfg(world, *extra), workdir, progress=False, devices=jax.devices()[:1], out=out or lines.append
  )
  return report, lines


@pytest.fixture(scope="module")
def reference(world, compile_cache, tmp_path_factory):
  wd = tmp_path_factory.mktemp("curate_ref")
  report, lines = _run(world, wd)
  return wd, report, lines


def _outputs(wd: Path) -> dict[str, bytes]:
  """Every data file a run leaves outside the training workdirs (whose metrics carry timings)."""
  return {
    str(p.relative_to(wd)): p.read_bytes()
    for p in sorted(wd.rglob("*.jsonl"))
    if "run" not in p.relative_to(wd).parts
  }


def _manifest_view(man: dict) -> dict:
  man = json.loads(json.dumps(man))
  man.pop("seconds")
  if "train" in man:
    man["train"].pop("resumed_from")
  return man


def _losses(run_dir: Path) -> dict:
  return {
    r["step"]: r["loss"]
    for r in _jsonl(run_dir / "metrics.jsonl")
    if "loss" in r and r.get("split") != "eval"
  }


# --------------------------------------------------------------------------------------------
# outputs


def test_every_stage_leaves_outputs_and_a_manifest(reference):
  wd, report, lines = reference
  for stage in STAGES:
    man = json.loads((wd / stage / "manifest.json").read_text())
    assert man["stage"] == stage and len(man["key"]) == 64 and man["seconds"] >= 0 and man["counts"]
    for rec in man["outputs"].values():
      assert (wd / stage / rec["path"]).is_file()
  for r in range(2):
    rd = wd / f"round_{r}"
    for f in (
      "score/scores_0.jsonl",
      "flip/flipped.jsonl",
      "filter/scores.jsonl",
      "filter/kept.jsonl",
      "filter/queue.jsonl",
      "judge/judgments.jsonl",
      "merge/reannotated.jsonl",
      "merge/curated.jsonl",
      "report.json",
    ):
      assert (rd / f).is_file(), f
    # the round's model: a training workdir with orbax checkpoints of every 2 steps
    assert sorted(
      int(p.name) for p in (rd / "train/run/checkpoints").iterdir() if p.name.isdigit()
    ) == [2, 4]
  assert (wd / "curated.jsonl").read_bytes() == (wd / "round_1/merge/curated.jsonl").read_bytes()
  assert json.loads((wd / "report.json").read_text()) == json.loads(json.dumps(report))
  for png in ("plots/strength_round_0.png", "plots/strength_round_1.png", "plots/counts.png"):
    assert (wd / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  text = "\n".join(lines)
  assert "round  input  negative  flipped" in text and "curated set:" in text


def test_report_counts_match_a_hand_recount(reference, world):
  """Each step recomputed from the stage files with plain arithmetic (not the library's steps)."""
  wd, report, _ = reference
  truth = json.loads((world / "noisy_truth.json").read_text())
  noisy = _jsonl(world / "noisy_pairs.jsonl")
  pairs = noisy
  for r, rr in enumerate(report["rounds"]):
    rd = wd / f"round_{r}"
    c = rr["counts"]
    key = lambda p, answer: score_key(p["images"], p["question"], answer)  # noqa: E731
    score = {key(s, s["answer"]): s["score"] for s in _jsonl(rd / "score/scores_0.jsonl")}
    # every unique answer scored once
    assert (
      len(score)
      == len(_jsonl(rd / "score/scores_0.jsonl"))
      == len(
        {
          score_key(p["images"], p["question"], a)
          for p in pairs
          for a in (p["chosen"], p["rejected"])
        }
      )
    )
    strength = [score[key(p, p["chosen"])] - score[key(p, p["rejected"])] for p in pairs]
    negative = sorted((i for i in range(len(pairs)) if strength[i] < 0), key=lambda i: strength[i])
    to_flip = set(negative[: math.floor(0.5 * len(negative))])
    flipped = _jsonl(rd / "flip/flipped.jsonl")
    assert [p["id"] for p in flipped] == [p["id"] for p in pairs]
    for i, (p, f) in enumerate(zip(pairs, flipped)):
      if i in to_flip:
        assert f["flipped"] and (f["chosen"], f["rejected"]) == (p["rejected"], p["chosen"])
      else:
        assert not f.get("flipped") and (f["chosen"], f["rejected"]) == (p["chosen"], p["rejected"])
    assert (c["input"], c["negative"], c["flipped"]) == (len(pairs), len(negative), len(to_flip))
    # filter: the retrained model's scores
    new = {key(s, s["answer"]): s["score"] for s in _jsonl(rd / "filter/scores.jsonl")}
    agree = [new[key(p, p["chosen"])] > new[key(p, p["rejected"])] for p in flipped]
    kept, queue = _jsonl(rd / "filter/kept.jsonl"), _jsonl(rd / "filter/queue.jsonl")
    assert [p["id"] for p in kept] == [p["id"] for p, a in zip(flipped, agree) if a]
    assert [p["id"] for p in queue] == [p["id"] for p, a in zip(flipped, agree) if not a]
    assert (c["kept"], c["queued"]) == (len(kept), len(queue)) and c["kept"] + c["queued"] == c[
      "input"
    ]
    # re-annotation: both orders per queued pair, one vote per valid judgment
    judgments = _jsonl(rd / "judge/judgments.jsonl")
    assert sorted((j["id"], tuple(j["order"])) for j in judgments) == sorted(
      (p["id"], o) for p in queue for o in ((0, 1), (1, 0))
    )
    assert c["judgments"] == 2 * len(queue)
    votes = {p["id"]: [0.0, 0.0, 0] for p in queue}
    for j in judgments:
      if j["scores"] is None:
        continue
      s0, s1 = j["scores"]
      v = votes[j["id"]]
      v[2] += 1
      if s0 == s1:
        v[0] += 0.5
        v[1] += 0.5
      else:
        v[j["order"][0] if s0 > s1 else j["order"][1]] += 1
    relabelled = {pid for pid, (a, b, n) in votes.items() if n >= 2 and b > a}
    survivors = {pid for pid, (a, b, n) in votes.items() if n >= 2 and a != b}
    reannotated = _jsonl(rd / "merge/reannotated.jsonl")
    assert {p["id"] for p in reannotated} == survivors
    assert (c["reannotated"], c["relabelled"], c["dropped"]) == (
      len(survivors),
      len(relabelled),
      len(queue) - len(survivors),
    )
    curated = _jsonl(rd / "merge/curated.jsonl")
    assert [p["id"] for p in curated] == [
      p["id"] for p in flipped if p["id"] in {q["id"] for q in kept} | survivors
    ]
    assert c["curated"] == len(curated) == c["kept"] + c["reannotated"]
    for p in curated:
      assert "flipped" not in p and "strength" not in p and p["meta"]["curation"][-1]["round"] == r
    # agreement with the truth, by hand
    right = lambda ps: sum(p["chosen"] == truth["correct_answer"][p["id"]] for p in ps) / len(ps)
    assert rr["truth"]["input_accuracy"] == round(right(pairs), 4)
    assert rr["truth"]["curated_accuracy"] == round(right(curated), 4)
    wrong = {p["id"] for p in pairs if p["chosen"] != truth["correct_answer"][p["id"]]}
    hit = len(wrong & {f["id"] for f in flipped if f.get("flipped")})
    assert rr["truth"]["flip_recall"] == (round(hit / len(wrong), 4) if wrong else None)
    pairs = curated  # round r+1 curates round r's curated set
  final = {p["id"]: p for p in _jsonl(wd / "curated.jsonl")}
  found = {p["id"] for p in noisy if p["id"] in final and final[p["id"]]["chosen"] != p["chosen"]}
  flipped_ids = set(truth["flipped_ids"])
  t = report["truth"]
  assert (t["found"], t["found_mislabelled"], t["mislabelled"]) == (
    len(found),
    len(found & flipped_ids),
    len(flipped_ids),
  )
  assert t["noise_recall"] == round(len(found & flipped_ids) / len(flipped_ids), 4)
  assert t["noise_precision"] == (
    round(len(found & flipped_ids) / len(found), 4) if found else None
  )


# --------------------------------------------------------------------------------------------
# resumption


DRIVER = """
import sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from mrm_jax.config import load_config
from mrm_jax.demo.curation import run_curation
cfg = load_config(sys.argv[1], sys.argv[3:])
run_curation(cfg, sys.argv[2], progress=False, devices=jax.devices()[:1])
"""


def _subprocess_env(compile_cache, **extra):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    TF_CPP_MIN_LOG_LEVEL="3",
    TOKENIZERS_PARALLELISM="false",
    JAX_COMPILATION_CACHE_DIR=str(compile_cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  env.pop(loop.FAULT_ENV, None)
  env.update(extra)
  return env


def test_killed_in_every_stage_in_turn_resumes_to_identical_outputs(
  reference, world, compile_cache, tmp_path, monkeypatch
):
  ref_wd, ref_report, _ = reference
  wd = tmp_path / "faulty"
  # unit of work at which each stage fails: training batches (checkpoints every 2 steps), scored
  # batches of 8 answers, judgments; the others fail at their end, just before the manifest
  faults = {
    "base/train": "@3",
    "round_0/train": "@3",
    "round_1/train": "@3",
    "round_1/filter": "@2",
  }
  for stage in STAGES:
    if stage == "round_0/score":
      # a real SIGKILL of a whole process, while it scores (after 2 of 3 batches)
      p = subprocess.run(
        [sys.executable, "-c", DRIVER, CONFIG, str(wd), *_overrides(world)],
        cwd=tmp_path,
        env=_subprocess_env(compile_cache, **{loop.FAULT_ENV: "round_0/score@2:kill"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
      )
      assert p.returncode == -9, p.stdout[-3000:]
      assert len(_jsonl(wd / "round_0/score/scores_0.log.jsonl")) == 2
    else:
      monkeypatch.setenv(loop.FAULT_ENV, stage + faults.get(stage, ""))
      with pytest.raises(loop.InjectedFault):
        _run(world, wd)
    assert not (wd / stage / "manifest.json").exists(), stage
    earlier = STAGES[: STAGES.index(stage)]
    assert all((wd / s / "manifest.json").is_file() for s in earlier)
  monkeypatch.delenv(loop.FAULT_ENV)
  report, lines = _run(world, wd)
  # resumed, not redone: training continued from the step-2 checkpoint, judging from its log
  for stage in ("base/train", "round_0/train", "round_1/train"):
    assert json.loads((wd / stage / "manifest.json").read_text())["train"]["resumed_from"] == 2
    assert _losses(wd / stage / "run") == _losses(ref_wd / stage / "run")
  assert _outputs(wd) == _outputs(ref_wd)
  for stage in STAGES:
    got = json.loads((wd / stage / "manifest.json").read_text())
    want = json.loads((ref_wd / stage / "manifest.json").read_text())
    assert _manifest_view(got) == _manifest_view(want), stage
  assert [r["counts"] for r in report["rounds"]] == [r["counts"] for r in ref_report["rounds"]]
  assert report["truth"] == ref_report["truth"]
  # a rerun of a finished run does nothing but report
  again, lines = _run(world, wd)
  assert all(
    line.endswith(")") and "done earlier" in line for line in lines if line.startswith("[")
  )
  assert again["rounds"] == report["rounds"] and again["truth"] == report["truth"]


def test_changed_setting_reruns_only_the_stages_it_affects(reference, world, tmp_path):
  """A copied workdir keeps its finished stages; a stored judge holding the same judgments changes
  the
  judge stage only, and the merge stage, fed identical judgments, is still done."""
  ref_wd, ref_report, _ = reference
  wd = tmp_path / "copy"
  shutil.copytree(ref_wd, wd)
  report, lines = _run(
    world,
    wd,
    "--config.curate.judge.kind=stored",
    f"--config.curate.judge.files={ref_wd}/round_{{round}}/judge/judgments.jsonl",
  )
  rerun = sorted(
    line.split("]")[0][1:] for line in lines if line.startswith("[") and "done earlier" not in line
  )
  assert rerun == ["round_0/judge", "round_1/judge"]
  assert _outputs(wd) == _outputs(ref_wd)
  assert report["rounds"][1]["counts"] == ref_report["rounds"][1]["counts"]


def test_stored_judgments_vote_exactly_as_counted_by_hand(reference, world, tmp_path):
  """Hand-made judgments of round 0's queue: q0 overturned by both orders, q1 with one valid
  judgment (no quorum), q2 split (tie), q3 with an extra invalid judgment, the rest confirmed. Only
  the judge
  and merge stages rerun (curate.rounds is no stage's input)."""
  ref_wd, ref_report, _ = reference
  wd = tmp_path / "stored"
  shutil.copytree(ref_wd, wd)
  queue = _jsonl(ref_wd / "round_0/filter/queue.jsonl")
  kept = _jsonl(ref_wd / "round_0/filter/kept.jsonl")
  assert len(queue) >= 4, "the fixture needs at least 4 queued pairs"

  def j(pid, order, scores):
    return {
      "id": pid,
      "mode": "pairwise",
      "order": order,
      "raw": "",
      "scores": scores,
      "error": None,
      "judge": "hand",
    }

  q = [p["id"] for p in queue]
  rows = [
    j(q[0], [0, 1], [2, 8]),
    j(q[0], [1, 0], [8, 2]),  # both for the original rejected
    j(q[1], [0, 1], [8, 2]),
    j(q[1], [1, 0], None),  # one valid judgment
    j(q[2], [0, 1], [8, 2]),
    j(q[2], [0, 1], [2, 8]),  # 1 : 1
    j(q[3], [0, 1], [8, 2]),
    j(q[3], [1, 0], [2, 8]),
    j(q[3], [1, 0], [5]),
    j("not-queued", [0, 1], [8, 2]),
  ]
  rows += [
    j(pid, order, [8, 2] if order == [0, 1] else [2, 8])
    for pid in q[4:]
    for order in ([0, 1], [1, 0])
  ]
  stored = tmp_path / "hand.jsonl"
  stored.write_text("".join(json.dumps(r) + "\n" for r in rows))
  report, lines = _run(
    world,
    wd,
    "--config.curate.rounds=1",
    "--config.curate.judge.kind=stored",
    f"--config.curate.judge.files={stored}",
  )
  rerun = sorted(
    line.split("]")[0][1:] for line in lines if line.startswith("[") and "done earlier" not in line
  )
  assert rerun == ["round_0/judge", "round_0/merge"]
  c = report["rounds"][0]["counts"]
  n = len(queue)
  assert (
    c["judgments"],
    c["reannotated"],
    c["relabelled"],
    c["no_quorum"],
    c["tied"],
    c["dropped"],
    c["invalid_judgments"],
    c["curated"],
  ) == (2 * n + 1, n - 2, 1, 1, 1, 2, 2, len(kept) + n - 2)
  curated = {p["id"]: p for p in _jsonl(wd / "curated.jsonl")}
  assert q[1] not in curated and q[2] not in curated and len(curated) == c["curated"]
  assert (curated[q[0]]["chosen"], curated[q[0]]["rejected"]) == (
    queue[0]["rejected"],
    queue[0]["chosen"],
  )
  assert curated[q[0]]["meta"]["curation"][-1] == {
    "round": 0,
    "flipped": bool(queue[0].get("flipped")),
    "outcome": "reannotated",
    "vote": {"votes": [2.0, 0.0], "judgments": 2, "swapped": True},
  }
  assert all(curated[pid]["chosen"] == p["chosen"] for pid, p in zip(q[3:], queue[3:]))
  assert len(report["rounds"]) == 1 and report["final"]["n_curated"] == c["curated"]


def test_command_reports_a_finished_run_and_refuses_bad_settings(
  reference, world, compile_cache, tmp_path
):
  ref_wd, ref_report, _ = reference
  wd = tmp_path / "cli"
  shutil.copytree(ref_wd, wd)
  cmd = [
    sys.executable,
    "-m",
    "mrm_jax.cli",
    "curate",
    "run",
    "--config",
    CONFIG,
    "--workdir",
    str(wd),
    "--no-progress",
    *_overrides(world),
  ]
  p = subprocess.run(
    cmd,
    cwd=tmp_path,
    env=_subprocess_env(compile_cache),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert "[round_1/merge] done earlier" in p.stdout and "curated set:" in p.stdout
  assert (
    json.loads((wd / "report.json").read_text())["rounds"][0]["counts"]
    == ref_report["rounds"][0]["counts"]
  )
  p = subprocess.run(
    cmd + ["--config.curate.min_votes=0"],
    cwd=tmp_path,
    env=_subprocess_env(compile_cache),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 2
  assert (
    p.stderr.strip().splitlines()[-1]
    == "mrm-jax curate: error: curate.min_votes must be at least 1, got 0"
  )


def test_bad_inputs_are_user_errors(world, tmp_path):
  cfg = _cfg(world)
  cfg.curate.world_dir = ""
  del cfg["world"]
  with pytest.raises(UserError, match="curate.noisy is not set"):
    loop.run_curation(cfg, tmp_path / "a", progress=False)
  dup = tmp_path / "dup.jsonl"
  rows = _jsonl(world / "noisy_pairs.jsonl")[:2]
  dup.write_text("".join(json.dumps({**r, "id": "same"}) + "\n" for r in rows))
  cfg.curate.noisy = str(dup)
  cfg.curate.base_train = str(dup)
  cfg.curate.image_root = str(world)
  cfg.model.path = str(world / "model")
  with pytest.raises(UserError, match=r"dup.jsonl:2: duplicate pair id 'same'"):
    loop.run_curation(cfg, tmp_path / "b", progress=False)
  del cfg["curate"]
  with pytest.raises(UserError, match="no 'curate' section"):
    loop.run_curation(cfg, tmp_path / "c", progress=False)
