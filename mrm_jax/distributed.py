"""Multi-process start-up shared by `train`, `score` and `curate run`.

`initialize(args)` calls `jax.distributed.initialize` with, in order of preference:
1. explicit `--coordinator_address HOST:PORT --num_processes N --process_id I`;
2. SLURM (`SLURM_JOB_ID` with more than one task): coordinator = first node of
   `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST` on port `MRM_JAX_COORDINATOR_PORT` (default
   12355 + job id % 1000, so concurrent jobs on a node do not collide), id/count from
   `SLURM_PROCID` / `SLURM_NTASKS`;
3. TPU pods (`TPU_WORKER_HOSTNAMES` lists several workers, or `MEGASCALE_*`): JAX's own detection;
and is a no-op for a single process. On CPU, cross-process collectives use gloo.

SLURM is detected here, not by JAX: JAX's SLURM detection also pins each process to one GPU
(`local_device_ids = [SLURM_LOCALID]`), which would leave 7 of 8 GPUs idle in
launch/slurm_gpu.sbatch's default one-process-per-node mode, and it needs `SLURM_STEP_NODELIST`
(set by srun only). For the same reason, when the settings are ours (flags or SLURM), JAX's
detection is switched off (`cluster_detection_method="deactivate"`): every process keeps the
devices it was given (`JAX_LOCAL_DEVICE_IDS` still restricts them).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils

from mrm_jax.errors import UserError

log = logging.getLogger(__name__)

_initialized = False


def add_arguments(parser) -> None:
  g = parser.add_argument_group(
    "multi-process (jax.distributed; auto-detected on TPU pods and SLURM)"
  )
  g.add_argument(
    "--coordinator_address",
    default=None,
    metavar="HOST:PORT",
    help="address of process 0's coordinator service",
  )
  g.add_argument(
    "--num_processes", type=int, default=None, metavar="N", help="total number of processes"
  )
  g.add_argument(
    "--process_id", type=int, default=None, metavar="I", help="this process's index, 0..N-1"
  )


def expand_nodelist(nodelist: str) -> list[str]:
  """SLURM hostlist syntax → host names: `gpu[01-03,07],cpu5` → gpu01 gpu02 gpu03 gpu07 cpu5."""
  hosts: list[str] = []
  for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
    m = re.match(r"^(.*?)\[([^\]]*)\](.*)$", item)
    if not m:
      hosts.append(item)
      continue
    prefix, ranges, suffix = m.groups()
    for part in ranges.split(","):
      if "-" in part:
        lo, hi = part.split("-", 1)
        width = len(lo)
        hosts += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
      else:
        hosts.append(f"{prefix}{part}{suffix}")
  return hosts


def slurm_settings(env=None) -> dict | None:
  """(coordinator_address, num_processes, process_id) from SLURM variables, or None outside a
  multi-task SLURM step."""
  env = os.environ if env is None else env
  if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
    return None
  ntasks = int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or 1)
  if ntasks <= 1:
    return None
  nodelist = (
    env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
  )
  if not nodelist:
    raise UserError("SLURM: SLURM_JOB_NODELIST is not set; pass --coordinator_address")
  host = expand_nodelist(nodelist)[0]
  port = int(env.get("MRM_JAX_COORDINATOR_PORT") or 12355 + int(env["SLURM_JOB_ID"]) % 1000)
  return {
    "coordinator_address": f"{host}:{port}",
    "num_processes": ntasks,
    "process_id": int(env["SLURM_PROCID"]),
  }


def _tpu_pod(env) -> bool:
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env


def resolve(args=None, env=None) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, `{}` for JAX's own auto-detection
  (TPU pods) or None for a single process."""
  env = os.environ if env is None else env
  addr = getattr(args, "coordinator_address", None)
  n = getattr(args, "num_processes", None)
  pid = getattr(args, "process_id", None)
  if addr or n is not None or pid is not None:
    if not addr or n is None or pid is None:
      raise UserError("--coordinator_address, --num_processes and --process_id go together")
    if not 0 <= pid < n:
      raise UserError(f"--process_id {pid} is outside 0..{n - 1}")
    return None if n == 1 else {"coordinator_address": addr, "num_processes": n, "process_id": pid}
  slurm = slurm_settings(env)
  if slurm:
    return slurm
  if _tpu_pod(env):
    return {}
  return None


def initialize(args=None) -> dict | None:
  """Joins the process group (once per process). Returns the settings used, or None when
  running as a single process."""
  global _initialized
  settings = resolve(args)
  if settings is None or _initialized:
    return settings

  if _backend_is_cpu():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  log.info(
    "jax.distributed.initialize(%s)", ", ".join(f"{k}={v}" for k, v in settings.items()) or "auto"
  )
  if settings:  # ours, whole: JAX's detection would only add a device restriction (see above)
    jax.distributed.initialize(**settings, cluster_detection_method="deactivate")
  else:
    jax.distributed.initialize()
  _initialized = True
  return settings


def _backend_is_cpu() -> bool:
  """Decided from the environment: asking JAX for its backend would start it before
  `jax.distributed.initialize`, which must come first."""
  platforms = os.environ.get("JAX_PLATFORMS", "") or os.environ.get("JAX_PLATFORM_NAME", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"

  return not any(
    importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
  )


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def allgather_or_stop(row, failed: bool, error: BaseException | None, message: str) -> np.ndarray:
  """Every process's `row` (integers, as many on every process), gathered `[processes, n]`, with a
  flag for the processes that failed. If any failed, every process raises: the failed one its own
  `error`, the others (and a failed one without an error) `UserError(message)`, whose
  `{processes}` names the failed ones. One allgather, on the calling thread."""
  mine = np.concatenate([[int(failed)], np.asarray(row, np.int64)])
  got = multihost_utils.process_allgather(mine)
  bad = [p for p, r in enumerate(got) if r[0]]
  if bad:
    if failed and error is not None:
      raise error
    raise UserError(message.format(processes=", ".join(map(str, bad))))
  return got[:, 1:]
