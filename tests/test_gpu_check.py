"""benchmarks/gpu_check.py: the prepared H200 check runs every step on CPU with tiny shapes
(--dry-run), with
tensorflow unimportable as on the device machine, so the device run cannot fail on a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

# sitecustomize on PYTHONPATH: `import tensorflow` fails in the check and in every step it starts
BLOCK_TF = (
  "import sys\nfor _m in ('tensorflow', 'tensorflow_datasets'):\n  sys.modules[_m] = None\n"
)

TRAIN = ("tokens_per_s", "step_s", "mfu", "peak_mem_gb", "pairs_per_s")
FIGURES = {
  "0": ("versions", "backend"),
  "1": ("families",),
  "2.1": TRAIN,
  "2.2": TRAIN,
  "2.3": TRAIN,
  "2.4": TRAIN,
  "3.1": ("sequences_per_s",),
  "3.2": ("sequences_per_s",),
  "4": ("pairs_per_s",),
}


def _run(out: Path, *args, tmp: Path) -> list[dict]:
  shim = tmp / "no_tf"
  shim.mkdir(exist_ok=True)
  (shim / "sitecustomize.py").write_text(BLOCK_TF)
  paths = [str(shim)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
  # two steps at a time: the dry run's steps are independent, and CI's time is short
  cmd = [
    sys.executable,
    "benchmarks/gpu_check.py",
    "--dry-run",
    "--jobs",
    "2",
    "--out",
    str(out),
    *args,
  ]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  return [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]


def test_dry_run_every_step_ok_without_tensorflow(tmp_path):
  lines = _run(tmp_path / "out", tmp=tmp_path)
  by_step = {rec["step"]: rec for rec in lines}
  assert [rec["step"] for rec in lines] == [s.id for s in gpu_check.STEPS] + ["summary"]
  assert by_step["0"]["figures"]["tensorflow_importable"] is False
  peer_missing = gpu_check.find_peer(None) is None
  for s in gpu_check.STEPS:
    rec = by_step[s.id]
    if peer_missing and s.needs_peer:  # the peer lives in shared/, beside the repository
      assert not rec["ok"] and "not found" in rec["error"]
      continue
    assert rec["ok"], f"step {s.id} {s.name}: {rec.get('error')}"
    for key in FIGURES[s.id]:
      assert key in rec["figures"], (s.id, key)
  fam = by_step["1"]["figures"]["families"]
  assert set(fam) == set(gpu_check.FAMILIES)
  assert all(f["bf16_auto_max_abs"] <= f["tolerance_bf16"] for f in fam.values())
  assert by_step["2.4"]["figures"]["remat"] == "full"
  summary = by_step["summary"]["figures"]
  assert summary["input_over_train_pairs"] > 0
  assert (
    summary["train_over_peer_tokens"] is None
    if peer_missing
    else summary["train_over_peer_tokens"] > 0
  )
  assert (tmp_path / "out" / "gpu_check.log").stat().st_size > 0


def test_only_selects_groups_and_budget_skips(tmp_path):
  assert [s.id for s in gpu_check.select("2,4")] == ["2.1", "2.2", "2.3", "2.4", "4"]
  assert [s.id for s in gpu_check.select("3.2")] == ["3.2"]
  lines = _run(
    tmp_path / "out", "--only", "1,3.2", "--budget", "1", tmp=tmp_path
  )  # nothing is started
  assert [(r["step"], r["ok"]) for r in lines] == [("1", False), ("3.2", False), ("summary", False)]
  assert all(r["error"].startswith("skipped") for r in lines[:2])
