"""Train state, the jitted train step and the eval step.

The NNX model is split once into a static graph definition and three states: the trainable
parameters (fp32 master weights, the only thing the optimizer sees), the frozen parameters
(the vision tower and merger by default) and any other variables. A train state is a plain
dict pytree — `{"step", "params", "frozen", "rest", "opt_state", "rng"}` — so it jits,
donates, shards and checkpoints without special cases.

`train_step(state, batch)` takes a batch whose arrays carry a leading micro-batch axis of
size `train.grad_accum` (each micro-batch is a normal collated pair batch); gradients are
averaged over micro-batches with `lax.scan`, so accumulation costs no extra memory per step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mrm_jax.train import sharding as shd
from mrm_jax.train.loss import pair_loss

VISION_PATH_NAMES = ("visual", "vision", "vision_tower", "vision_model", "merger")


def is_vision_path(path) -> bool:
  """True for parameters of the vision tower or the patch merger (frozen by default)."""
  for p in path:
    s = str(getattr(p, "key", getattr(p, "name", p)))
    if s in VISION_PATH_NAMES or s.startswith("vision") or s.startswith("visual"):
      return True
  return False


def trainable_filter(freeze_vision: bool) -> Callable:
  def f(path, value):
    return isinstance(value, nnx.Param) and not (freeze_vision and is_vision_path(path))

  return f


def split_model(model, freeze_vision: bool):
  """(graphdef, params, frozen, rest) — see the module docstring."""
  return nnx.split(model, trainable_filter(freeze_vision), nnx.Param, ...)


def new_state(tx: optax.GradientTransformation, params, frozen, rest, seed: int) -> dict:
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "frozen": frozen,
    "rest": rest,
    "opt_state": tx.init(params),
    "rng": jax.random.key_data(jax.random.key(seed)),
  }


class Trainer:
  """Holds the static parts of training (graph, optimizer, loss settings, mesh) and the
  jitted `train_step` / `eval_step` built from them."""

  def __init__(
    self,
    graphdef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    mesh,
    state_sharding,
    grad_accum: int = 1,
    margin_scale: float = 0.0,
    center_weight: float = 0.0,
  ):
    self.graphdef = graphdef
    self.tx = tx
    self.schedule = schedule
    self.mesh = mesh
    self.state_sharding = state_sharding
    self.grad_accum = max(1, int(grad_accum))
    self.margin_scale = float(margin_scale)
    self.center_weight = float(center_weight)
    repl = shd.replicated(mesh)
    self.train_step = jax.jit(
      self._train_step, donate_argnums=(0,), out_shardings=(state_sharding, repl)
    )
    self.eval_step = jax.jit(self._eval_step, out_shardings=repl)

  # -- state -----------------------------------------------------------------------------------
  def init_state(self, params, frozen, rest, seed: int) -> dict:
    """A sharded train state at step 0 from (already sharded) model states."""
    make = lambda p, f, r: new_state(self.tx, p, f, r, seed)  # noqa: E731
    return jax.jit(make, out_shardings=self.state_sharding)(params, frozen, rest)

  def abstract_state(self, params, frozen, rest) -> dict:
    """ShapeDtypeStructs of the train state carrying the target shardings (restore target)."""
    shaped = jax.eval_shape(lambda p, f, r: new_state(self.tx, p, f, r, 0), params, frozen, rest)
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shaped, self.state_sharding
    )

  # -- steps -----------------------------------------------------------------------------------
  def _rewards(self, params, frozen, rest, batch):
    model = nnx.merge(self.graphdef, params, frozen, rest)
    return model(batch).astype(jnp.float32)

  def _micro(self, params, frozen, rest, batch):
    def loss_fn(p):
      rewards = self._rewards(p, frozen, rest, batch)
      return pair_loss(
        rewards,
        batch.get("strength"),
        margin_scale=self.margin_scale,
        center_weight=self.center_weight,
      )

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics

  def _train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
    params, frozen, rest = state["params"], state["frozen"], state["rest"]
    k = self.grad_accum
    if k == 1:
      grads, metrics = self._micro(params, frozen, rest, jax.tree.map(lambda x: x[0], batch))
    else:

      def body(acc, mb):
        g, m = self._micro(params, frozen, rest, mb)
        return jax.tree.map(jnp.add, acc, g), m

      zeros = jax.tree.map(jnp.zeros_like, params)
      grads, stacked = jax.lax.scan(body, zeros, batch)
      grads = jax.tree.map(lambda g: g / k, grads)
      metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), stacked)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = self.schedule(state["step"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  def _eval_step(self, state: dict, batch: dict) -> dict:
    """Sums (not means) over the real pairs of one batch, so the loop can average exactly over
    a whole eval set whose last batch is padded (`pair_mask` [B], 1 = real pair)."""
    rewards = self._rewards(state["params"], state["frozen"], state["rest"], batch)
    w = batch.get("pair_mask")
    _, m = pair_loss(
      rewards,
      batch.get("strength"),
      margin_scale=self.margin_scale,
      center_weight=self.center_weight,
      weights=w,
    )
    n = jnp.sum(w.astype(jnp.float32)) if w is not None else jnp.float32(rewards.shape[0] // 2)
    out = {k: v * n for k, v in m.items()}
    out["count"] = n
    return out
