"""The performance harness runs the project's real train step (harness correctness on CPU, not
speed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_tiny_preset_reports_finite_figures():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run(
    [sys.executable, "benchmarks/train_step.py", "--preset", "tiny", "--steps", "2"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for key in ("tokens_per_s", "pairs_per_s", "step_s", "mfu", "peak_mem_gb"):
    assert key in out
  assert (
    out["pairs"] == 2 and out["seq"] == 48 + 4
  )  # 48 text tokens + one 56x56 image = 4 merged tokens
  assert (
    out["step_s"] > 0
    and abs(out["tokens_per_s"] - 2 * 2 * out["seq"] / out["step_s"]) <= 0.01 * out["tokens_per_s"]
  )
  assert 0.0 < out["loss"] < 5.0  # a finite Bradley-Terry loss near log 2 at init


def _json_line(args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )
  assert r.returncode == 0, r.stderr
  return [json.loads(line) for line in r.stdout.strip().splitlines() if line.startswith("{")]


def test_2b_train_step_with_full_remat_traces_and_lowers_on_cpu():
  """Issue 17: the paper's remat setting at the 2B shape lowers (nothing is allocated or run)."""
  out = _json_line(
    ["benchmarks/train_step.py", "--preset", "qwen2vl_2b_shape", "--remat", "full", "--lower-only"]
  )[-1]
  assert out["lowered"] and out["pairs"] == 8 and out["seq"] == 1024
  assert 18e12 < out["flops_per_pair"] < 30e12  # the forward recomputed once more, no more


def test_flops_script_reports_executed_and_useful_flops():
  (out,) = _json_line(["benchmarks/flops.py", "--preset", "tiny"])
  assert out["workload"] == "bench" and out["layout"] == "pairs"
  assert 1.0 <= out["flops_per_pair"] / out["useful_flops_per_pair"] < 2.0
  assert out["vision_16_over_16x1"] <= 1.1  # attention per image: linear in the number of images
