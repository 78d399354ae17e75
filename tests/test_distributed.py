"""`mrm_jax.distributed`: which settings reach jax.distributed.initialize (explicit flags, SLURM,
TPU pods, single process). The real multi-process joins run in test_train_runs.py."""

import argparse

import pytest

from mrm_jax import distributed as d
from mrm_jax.errors import UserError


def args(**kw):
  ns = argparse.Namespace(coordinator_address=None, num_processes=None, process_id=None)
  for k, v in kw.items():
    setattr(ns, k, v)
  return ns


def test_expand_slurm_nodelists():
  assert d.expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
  assert d.expand_nodelist("node7") == ["node7"]
  assert d.expand_nodelist("a[8-10]-ib,b") == ["a8-ib", "a9-ib", "a10-ib", "b"]


def test_single_process_is_a_no_op():
  assert d.resolve(args(), env={}) is None
  assert d.resolve(args(coordinator_address="h:1", num_processes=1, process_id=0), env={}) is None
  # a one-task SLURM allocation is a single process too
  assert (
    d.resolve(
      args(),
      env={
        "SLURM_JOB_ID": "1",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NODELIST": "n1",
      },
    )
    is None
  )


def test_explicit_flags_win_and_are_checked():
  env = {
    "SLURM_JOB_ID": "9",
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_JOB_NODELIST": "x[1-4]",
  }
  got = d.resolve(args(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1), env=env)
  assert got == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
  with pytest.raises(UserError, match="go together"):
    d.resolve(args(coordinator_address="h:1"), env={})
  with pytest.raises(UserError, match="outside 0..1"):
    d.resolve(args(coordinator_address="h:1", num_processes=2, process_id=2), env={})


def test_slurm_detection_uses_first_step_node_and_job_port():
  env = {
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "8",
    "SLURM_JOB_NODELIST": "gpu[10-11]",
    "SLURM_STEP_NODELIST": "gpu[11-12]",
  }
  assert d.resolve(args(), env=env) == {
    "coordinator_address": f"gpu11:{12355 + 456}",
    "num_processes": 8,
    "process_id": 3,
  }
  env["MRM_JAX_COORDINATOR_PORT"] = "7777"
  del env["SLURM_STEP_NODELIST"]
  assert d.resolve(args(), env=env)["coordinator_address"] == "gpu10:7777"


def test_tpu_pod_defers_to_jax_autodetection():
  assert d.resolve(args(), env={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
  assert d.resolve(args(), env={"TPU_WORKER_HOSTNAMES": "t0"}) is None
