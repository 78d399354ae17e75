"""Failures that tests inject into resumable work, named by environment variables.

Normal runs never set these. A test sets one to stop a run at a chosen unit of work and then
checks that the next run resumes to the same outputs as an uninterrupted one.

  MRM_JAX_CURATE_FAULT="STAGE[@N][:kill],..."   (FAULT_ENV; `curate run` and the demo's stages)
      at the N-th unit of work of that stage (N = 1 by default) raise `InjectedFault`, or SIGKILL
      the process with ":kill". Which units a stage counts is up to the stage (`Faults.tick`).
  MRM_JAX_FAULT_SCORE_STOP_AFTER_CHUNKS=N          (SCORE_STOP_ENV; `mrm-jax score`)
      raise `InjectedFault` once N chunks were logged, as a killed run would leave them.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

FAULT_ENV = "MRM_JAX_CURATE_FAULT"
SCORE_STOP_ENV = "MRM_JAX_FAULT_SCORE_STOP_AFTER_CHUNKS"


class InjectedFault(RuntimeError):
  """Raised where a test asked for a failure."""


class Faults:
  """The stage faults of one spec ("STAGE[@N][:kill],..."): `tick(stage)` per unit of work."""

  def __init__(self, spec: str):
    self.rules: dict[str, tuple[int, bool]] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
      kill = item.endswith(":kill")
      item = item[: -len(":kill")] if kill else item
      name, _, n = item.partition("@")
      self.rules[name] = (int(n or 1), kill)
    self.counts: dict[str, int] = {}

  @classmethod
  def from_env(cls, env: str = FAULT_ENV) -> Faults:
    return cls(os.environ.get(env, ""))

  def active(self, stage: str) -> bool:
    return stage in self.rules

  def tick(self, stage: str) -> None:
    if stage not in self.rules:
      return
    self.counts[stage] = self.counts.get(stage, 0) + 1
    n, kill = self.rules[stage]
    if self.counts[stage] == n:
      if kill:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
      raise InjectedFault(f"injected fault in {stage} at unit {n}")


def stop_after(env: str, unit: str) -> Callable[[int], None]:
  """`check(n)`, called after the n-th unit of work: raises `InjectedFault` when n is the count
  the variable `env` names (never when it is unset or 0)."""
  limit = int(os.environ.get(env, "0") or 0)

  def check(n: int) -> None:
    if limit and n == limit:
      raise InjectedFault(f"{env}={limit}: stopped after {n} {unit}")

  return check
