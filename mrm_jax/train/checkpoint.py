"""Checkpoints under `WORKDIR/checkpoints/` (orbax `CheckpointManager`).

Each step directory holds two items: `state` (the train state pytree: params, frozen params,
other variables, optimizer state, step, RNG key data) and `data` (the input pipeline's
iterator state, JSON). Saves are asynchronous (training continues while the arrays are
written), atomic (orbax writes to a temporary directory and renames it when complete, so a
kill mid-save leaves the previous checkpoint as the latest) and keep the last
`train.keep_checkpoints`. Restoring takes an abstract target carrying the *current*
shardings, so a checkpoint written on one mesh / device count restores onto any other.

A step directory that cannot be restored (files truncated or damaged after the save, by a full disk,
a bad copy or a broken filesystem) is skipped with a one-line warning naming it, and the previous
step is used; `restore_latest(..., set_aside=True)` (training) also renames the unreadable ones to
`STEP.unreadable` so that the resumed run can save those steps again (orbax ignores such names).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from mrm_jax.distributed import barrier
from mrm_jax.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def _ocp():
  return ocp


class Checkpointer:
  def __init__(self, workdir: str | Path, keep: int = 2, async_save: bool = True):
    ocp = _ocp()
    self.directory = Path(workdir).resolve() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max(1, int(keep)), create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data")
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict | None) -> None:
    ocp = _ocp()
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
      ),
      force=True,
    )

  def restore(self, step: int | None, abstract_state) -> tuple[object, dict]:
    """(state, data_state) of `step`, placed on `abstract_state`'s shardings. Without a step: the
    newest one that restores (see `restore_latest`)."""
    if step is None:
      got = self.restore_latest(abstract_state)
      if got is None:
        raise UserError(f"{self.directory}: no checkpoint found")
      return got[1], got[2]
    try:
      return self._restore(step, abstract_state)
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types for damaged files
      raise UserError(
        f"{self.step_dir(step)}: checkpoint cannot be restored ({_short(e)})"
      ) from None

  def _restore(self, step: int, abstract_state) -> tuple[object, dict]:
    ocp = _ocp()
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
      ),
    )
    return out["state"], dict(out["data"] or {})

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def restore_latest(
    self, abstract_state, *, set_aside: bool = False
  ) -> tuple[int, object, dict] | None:
    """(step, state, data_state) of the newest checkpoint that restores, or None when there is none.

    An unreadable step is skipped with a warning naming its directory. `set_aside`: once an older
    step restored, rename the unreadable newer ones to STEP.unreadable, so that saving those steps
    again works. When no step restores, a UserError carries the newest one's error (a damaged
    checkpoint,
    or a config that no longer matches the saved shapes) and nothing is renamed."""
    failed: list[tuple[int, Exception]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        with _quiet_aborted_reads():
          state, data_state = self._restore(step, abstract_state)
      # orbax / tensorstore raise many types for damaged files
      except Exception as e:
        failed.append((step, e))
        continue
      moved = self._set_aside([s for s, _ in failed]) if set_aside and failed else {}
      for bad, e in failed:
        log.warning(
          "%s: checkpoint cannot be restored (%s); using step %d%s",
          self.step_dir(bad),
          _short(e),
          step,
          f"; moved it to {moved[bad]}" if bad in moved else "",
        )
      return step, state, data_state
    if failed:
      step, e = failed[0]
      raise UserError(
        f"{self.step_dir(step)}: checkpoint cannot be restored ({_short(e)}), "
        f"nor any older one in {self.directory}"
      )
    return None

  def _set_aside(self, steps: list[int]) -> dict[int, Path]:
    """Renames step directories to STEP.unreadable (process 0; the others wait, then all rescan)."""
    moved = {}
    for step in steps:
      target, k = self.directory / f"{step}.unreadable", 1
      while target.exists():
        target, k = self.directory / f"{step}.unreadable.{k}", k + 1
      if jax.process_index() == 0:
        self.step_dir(step).rename(target)
      moved[step] = target
    barrier("checkpoint: unreadable steps set aside")
    self.manager.reload()
    return moved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


_ABORTED_READ_NOISE = ("Event loop is closed", "cannot schedule new futures after")


def _is_aborted_read_noise(exc) -> bool:
  closed_loop = isinstance(exc, RuntimeError) and str(exc).startswith(_ABORTED_READ_NOISE)
  return closed_loop or "tensorstore" in str(exc).lower()


def _drop_aborted_read_records(record: logging.LogRecord) -> bool:
  exc = record.exc_info[1] if record.exc_info else None
  return not (exc is not None and _is_aborted_read_noise(exc))


@contextlib.contextmanager
def _quiet_aborted_reads():
  """When one array of a damaged step fails to read, orbax closes its event loop while tensorstore's
  other reads are still in flight; each of them then reports a traceback ('Event loop is closed',
  coroutines 'never retrieved' with a TensorStore spec of dozens of lines) through sys.excepthook,
  sys.unraisablehook or asyncio's logger, depending on when the garbage collector meets it. Those
  say nothing the one-line warning does not: drop exactly them while restoring; anything else
  still reaches the original hooks and handlers."""
  except_hook, unraisable_hook = sys.excepthook, sys.unraisablehook
  asyncio_log = logging.getLogger("asyncio")

  def on_except(kind, exc, tb):
    if not _is_aborted_read_noise(exc):
      except_hook(kind, exc, tb)

  def on_unraisable(u):
    if not _is_aborted_read_noise(u.exc_value):
      unraisable_hook(u)

  sys.excepthook, sys.unraisablehook = on_except, on_unraisable
  # futures of the aborted reads can outlive the restore (collected at exit): this filter stays
  asyncio_log.addFilter(_drop_aborted_read_records)
  try:
    yield
  except BaseException:
    # the aborted reads report within moments (and when their tasks are collected): let them do
    # so into the filters
    time.sleep(0.5)
    gc.collect()
    raise
  finally:
    sys.excepthook, sys.unraisablehook = except_hook, unraisable_hook


def _short(e: Exception, limit: int = 300) -> str:
  """An exception as one short line (tensorstore's messages span lines and can be very long)."""
  text = " ".join(f"{type(e).__name__}: {e}".split())
  return text if len(text) <= limit else text[:limit] + "..."


def has_checkpoint(workdir: str | Path) -> bool:
  d = Path(workdir) / CHECKPOINT_DIR
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())
