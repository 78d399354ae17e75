"""The pairwise reward-model loss (DESIGN §6), always in float32.

Bradley-Terry: `-log σ(r_c − r_r − margin)`, averaged over pairs, with
`margin = margin_scale · strength` (0 by default, the paper's plain loss) and an optional
reward-centering term `center_weight · mean((r_c + r_r)²)` that keeps rewards near zero
without changing their order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_pair_rewards(rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A pair batch of B pairs holds chosen rows 0..B-1 and rejected rows B..2B-1."""
  rewards = rewards.astype(jnp.float32)
  b = rewards.shape[0] // 2
  return rewards[:b], rewards[b:]


def pair_loss(
  rewards: jax.Array,
  strength: jax.Array | None = None,
  *,
  margin_scale: float = 0.0,
  center_weight: float = 0.0,
  weights: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """Returns (loss, metrics) for rewards [2B]. `weights` [B] (1 = real pair, 0 = padding) lets
  evaluation pad a last partial batch without biasing the means."""
  chosen, rejected = split_pair_rewards(rewards)
  diff = chosen - rejected
  if margin_scale and strength is not None:
    diff = diff - margin_scale * strength.astype(jnp.float32)
  per_pair = -jax.nn.log_sigmoid(diff)
  if center_weight:
    per_pair = per_pair + center_weight * jnp.square(chosen + rejected)
  w = jnp.ones_like(chosen) if weights is None else weights.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  loss = jnp.sum(per_pair * w) / n
  metrics = {
    "loss": loss,
    "accuracy": jnp.sum((chosen > rejected).astype(jnp.float32) * w) / n,  # ties are wrong
    "reward_margin": jnp.sum((chosen - rejected) * w) / n,
    "reward_chosen": jnp.sum(chosen * w) / n,
    "reward_rejected": jnp.sum(rejected * w) / n,
  }
  return loss, metrics
