"""Training metrics: `WORKDIR/metrics.jsonl`, TensorBoard event files, console lines, MFU."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from mrm_jax.io import AppendLog, write_jsonl

log = logging.getLogger(__name__)

# -- metrics.jsonl ---------------------------------------------------------------------------------


class MetricsLog:
  """Append-only `metrics.jsonl`. On resume from step S, lines of steps > S (logged by the
  killed run after its last checkpoint) are dropped, so the file reads as one clean run."""

  def __init__(self, path: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = Path(path)
    if not enabled:
      return
    log = AppendLog(self.path)
    keep = [r for r in log.records if int(r.get("step", 0)) <= resume_step]
    log.close()
    if len(keep) != len(log.records):
      write_jsonl(self.path, keep)
    self._log = AppendLog(self.path)

  def write(self, record: dict) -> None:
    if self.enabled:
      # A diverging metric (an infinite grad norm, say) is worth a record, not a stopped run: JSON
      # has no NaN or Infinity, so it is written as null.
      self._log.append(
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
      )

  def close(self) -> None:
    if self.enabled:
      self._log.close()


# -- TensorBoard -----------------------------------------------------------------------------------


class TensorBoardWriter:
  """Scalars to `DIR/events.out.tfevents.*` through `tf.summary`. Where TensorFlow cannot be
  imported (the GPU check machine has none), no events are written and one warning says so:
  metrics.jsonl holds the same numbers."""

  def __init__(self, logdir: str | os.PathLike):
    try:  # here, not at the top: TensorFlow is optional for training and slow to import
      import tensorflow as tf  # noqa: PLC0415
    except ImportError:
      log.warning("TensorFlow is not importable: no TensorBoard events (metrics.jsonl is written)")
      self._tf = self._writer = None
      return
    self._tf = tf
    self._writer = tf.summary.create_file_writer(str(logdir))
    # What tensorboard's tf.summary.scalar writes, without needing the tensorboard package.
    self._metadata = tf.compat.v1.SummaryMetadata(
      plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"), data_class=1
    )  # DATA_CLASS_SCALAR

  def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
    vals = {
      prefix + k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)
    }
    if self._writer is None or not vals:
      return
    with self._writer.as_default(step=step):
      for tag, value in vals.items():
        self._tf.summary.write(
          tag, self._tf.constant(float(value), self._tf.float32), metadata=self._metadata
        )
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


# -- model FLOPs / MFU -----------------------------------------------------------------------------

# Dense bf16 peak per chip (vendor figures; H100/H200 use the 790 TFLOP/s matmul rate measured in
# shared/bench so MFU is comparable with the PyTorch peer numbers).
PEAK_FLOPS = {
  "h200": 790e12,
  "h100": 790e12,
  "a100": 312e12,
  "l4": 121e12,
  "b200": 2250e12,
  "tpu v4": 275e12,
  "tpu v5 lite": 197e12,
  "tpu v5e": 197e12,
  "tpu v5p": 459e12,
  "tpu v5": 459e12,
  "tpu v6 lite": 918e12,
  "tpu v6e": 918e12,
}


def peak_flops_per_device(device) -> float | None:
  kind = str(getattr(device, "device_kind", "")).lower()
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key in kind:
      return PEAK_FLOPS[key]
  return None


def step_flops(spec: dict, rows: int, seq_len: int, patches: int) -> float:
  """Model FLOPs of one train step, counted as in shared/bench/peer_torch_rm_step.py: 6·N per
  trained LM token (forward + backward), 2·N per patch through a frozen vision tower (6·N when it
  trains), plus attention (QKᵀ and PV, full square, ×3 for forward + backward in the LM).

  `spec`: n_lm (LM parameters without the embedding table), n_vis, lm_layers, lm_attn_dim
  (heads · head_dim), vis_layers, vis_attn_dim, vision_trained. `patches` counts patches over the
  whole batch; vision attention is counted per image over `patches / rows`-patch images.
  """
  tokens = rows * seq_len
  vis_mult = 6 if spec.get("vision_trained") else 2
  attn_lm = (
    spec.get("lm_layers", 0) * 2 * 2 * seq_len * seq_len * spec.get("lm_attn_dim", 0) * rows * 3
  )
  per_image = patches / rows if rows else 0
  attn_vis = (
    spec.get("vis_layers", 0)
    * 2
    * 2
    * per_image
    * per_image
    * spec.get("vis_attn_dim", 0)
    * rows
    * (3 if spec.get("vision_trained") else 1)
  )
  return (
    6 * spec.get("n_lm", 0) * tokens
    + vis_mult * spec.get("n_vis", 0) * patches
    + attn_lm
    + attn_vis
  )


def format_console(step: int, total: int, m: dict) -> str:
  parts = [
    f"step {step}/{total}",
    f"loss {m['loss']:.4f}",
    f"acc {m['accuracy']:.3f}",
    f"margin {m.get('reward_margin', 0.0):+.3f}",
    f"gnorm {m.get('grad_norm', 0.0):.3f}",
    f"lr {m['learning_rate']:.2e}",
  ]
  if m.get("tokens_per_s"):
    parts.append(f"{m['tokens_per_s']:.0f} tok/s")
  if m.get("mfu") is not None:
    parts.append(f"mfu {m['mfu']:.1%}")
  return "  ".join(parts)


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """metrics.jsonl → records (for tests, plots and the demo summary)."""
  path = Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = [
  "MetricsLog",
  "TensorBoardWriter",
  "step_flops",
  "peak_flops_per_device",
  "format_console",
  "read_metrics",
]
