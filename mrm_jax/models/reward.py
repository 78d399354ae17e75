"""The reward model: a family backbone plus LLaMA-Factory's scalar value head.

The head (`v_head.summary`, `Linear(hidden, 1)`) reads the last-layer hidden state of the last
non-padding token of each row, i.e. the last position where `attention_mask == 1`, so left and
right padding give the same reward. With Qwen chat templates that token is the newline after the
assistant's `<|im_end|>`, exactly what LLaMA-Factory's `stage: rm` scores.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mrm_jax.models.common import Linear, resolve_attention
from mrm_jax.models.families import get_family


def last_token_index(attention_mask: jax.Array) -> jax.Array:
  """Index of the last position with `attention_mask == 1` per row (0 for an all-padding row)."""
  t = attention_mask.shape[-1]
  pos = jnp.arange(t, dtype=jnp.int32)
  return jnp.max(jnp.where(attention_mask.astype(bool), pos, 0), axis=-1)


class RewardModel(nnx.Module):
  """`RewardModel(batch) -> rewards [B] float32`. `family` is the family module, `config` its
  Config."""

  def __init__(
    self,
    family: ModuleType,
    config,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention: str | None = None,
    remat: str = "none",
    head_init: str = "normal",
  ):
    """`attention`: "auto" / None (resolved by `common.resolve_attention` for this process's
    platform and `dtype`), "xla" or "cudnn"."""
    self.family_name = family.MODEL_TYPE
    self.config = config
    attention = resolve_attention(
      attention, dtype, head_dims=(config.text.head_dim, config.vision.head_dim)
    )
    self.backbone = family.Backbone(
      config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat
    )
    # LLaMA-Factory initialises the value head with a small normal; "zeros" gives reward 0
    # everywhere.
    std = 0.0 if head_init == "zeros" else 1.0 / (config.hidden_size + 1)
    self.v_head = Linear(
      config.hidden_size,
      1,
      axes=("embed", None),
      dtype=jnp.float32,
      param_dtype=param_dtype,
      rngs=rngs,
      init_std=std,
    )

  @property
  def family(self) -> ModuleType:

    return get_family(self.family_name)

  def hidden_and_rewards(self, batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    """(last hidden states, rewards). A batch of the shared-prompt layout (`reward_index`, one row
    per pair) gives the rewards of [chosen of every row, rejected of every row], as an unshared
    pair batch does."""
    hidden = self.backbone(batch)
    if "reward_index" in batch:
      idx = jnp.asarray(batch["reward_index"]).astype(jnp.int32).T.reshape(-1)
      rows = jnp.tile(jnp.arange(hidden.shape[0]), 2)
      last = hidden[rows, idx]
    else:
      idx = last_token_index(jnp.asarray(batch["attention_mask"]))
      last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
    return hidden, self.v_head(last.astype(jnp.float32))[:, 0]

  def __call__(self, batch: dict[str, Any]) -> jax.Array:
    return self.hidden_and_rewards(batch)[1]
