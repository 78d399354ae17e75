"""AdamW with linear warmup + cosine decay and global-norm clipping (DESIGN §6).

The schedule matches transformers' `get_cosine_schedule_with_warmup` (what LLaMA-Factory
uses): lr rises linearly from 0 over `ceil(warmup_ratio · steps)` steps, then follows a
cosine to 0 at the last step. Weight decay skips vectors (biases, norm scales). Only the
trainable parameters ever reach the optimizer: frozen ones (the vision tower) are split
off before it, so they cost no optimizer memory at all.
"""

from __future__ import annotations

import math

import jax
import optax


def warmup_steps(num_steps: int, warmup_ratio: float) -> int:
  return int(math.ceil(max(0.0, warmup_ratio) * num_steps))


def make_schedule(learning_rate: float, num_steps: int, warmup_ratio: float) -> optax.Schedule:
  num_steps = max(1, int(num_steps))
  warm = min(warmup_steps(num_steps, warmup_ratio), num_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=learning_rate,
    warmup_steps=warm,
    decay_steps=num_steps,
    end_value=0.0,
  )


def _decay_mask(params):
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(
  train_cfg, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) from the `train` config section. State stays float32: the
  parameters it is initialised with are the fp32 master weights."""
  schedule = make_schedule(train_cfg.learning_rate, num_steps, train_cfg.warmup_ratio)
  parts = []
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(
    optax.adamw(
      schedule,
      b1=train_cfg.get("adam_b1", 0.9),
      b2=train_cfg.get("adam_b2", 0.999),
      eps=train_cfg.get("adam_eps", 1e-8),
      weight_decay=train_cfg.weight_decay,
      mask=_decay_mask,
    )
  )
  return optax.chain(*parts), schedule
