"""Mesh creation and the ONE mapping from logical axis names to mesh axes.

Models annotate parameters with logical names (`"embed"`, `"mlp"`, `"heads"`, ...; see
docs/internals.md). Only this module knows how those names land on the physical mesh
`("data", "fsdp", "tensor")`, MaxText-style: change the rules here and every model follows.
A dimension whose size does not divide evenly by its mesh axis is replicated instead of
failing, so tiny test models and odd head counts run on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mrm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch (row) dimension is split over both

# logical name -> mesh axis (or None = replicated). FSDP shards the model dimension of every
# weight; tensor parallelism splits heads and the MLP/vocabulary dimension (Megatron layout).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": BATCH_AXES,
  "vocab": "tensor",
  "embed": "fsdp",
  "mlp": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "vision_embed": "fsdp",
  "vision_mlp": "tensor",
  "vision_heads": "tensor",
}


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves `mesh.data/fsdp/tensor` (one of them may be -1 = fill) against the device count."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise UserError(f"mesh: at most one axis may be -1 (fill), got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise UserError(
        f"mesh: {num_devices} devices cannot be split into {dict(zip(MESH_AXES, sizes))}"
      )
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(
      f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
      f"but {num_devices} are available"
    )
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh(("data","fsdp","tensor"))` over all (or the given) devices, topology-aware when
  possible."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # unusual topologies: plain order (processes stay contiguous)
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(
  names: Sequence[str | None] | None,
  shape: Sequence[int],
  mesh: Mesh,
  rules: Mapping[str, Any] = LOGICAL_RULES,
) -> PartitionSpec:
  """PartitionSpec for one array: each logical name mapped by `rules`, a mesh axis used at most
  once, and any dimension not divisible by its mesh axes replicated."""
  if not names:
    return PartitionSpec()
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for name, size in zip(names, shape):
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
    else:
      out.append(None)
  return PartitionSpec(*out)


def _logical_names(variable) -> tuple | None:
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
  return tuple(names) if names else None


def state_shardings(state, mesh: Mesh):
  """NamedShardings for an `nnx.State` (abstract or concrete) from its variables' logical axes.

  Returns a pytree with the same structure as `state` whose leaves are `NamedSharding`s.
  """

  def one(v):
    if isinstance(v, nnx.Variable):
      value = v.get_value()
      return v.replace(NamedSharding(mesh, logical_to_spec(_logical_names(v), value.shape, mesh)))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_spec(shape: Sequence[int], mesh: Mesh, axis: int = 0) -> PartitionSpec:
  """Rows split over (data, fsdp) when they divide evenly; otherwise replicated."""
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if len(shape) <= axis or n == 1 or shape[axis] % n:
    return PartitionSpec()
  spec = [None] * len(shape)
  spec[axis] = BATCH_AXES
  return PartitionSpec(*spec)


# Per-row arrays of a collated batch (the shared-prompt layout's included), and those whose row
# axis is not the first one.
ROW_KEYS = (
  "input_ids",
  "attention_mask",
  "position_ids",
  "strength",
  "token_type_ids",
  "pair_b_index",
  "pair_r_index",
  "pair_lengths",
  "pair_r_slot",
  "reward_index",
)
ROW_AXIS = {"position_ids": 1}


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, leading: int = 0) -> dict:
  """Sharding per batch array: the row axis (after `leading` stacked axes, e.g. grad-accum
  micro-batches) over (data, fsdp). Arrays that are not per-row (image patches, grids) stay
  replicated so host-computed indices into them remain valid."""
  out = {}
  for k, v in batch.items():
    shape = np.shape(v)
    if k in ROW_KEYS or k in ROW_AXIS:
      out[k] = NamedSharding(mesh, batch_spec(shape, mesh, leading + ROW_AXIS.get(k, 0)))
    else:
      out[k] = NamedSharding(mesh, PartitionSpec())
  return out


def put_batch(batch: Mapping[str, Any], mesh: Mesh, leading: int = 0) -> dict:
  """Host batch (numpy) → global jax arrays laid out by `batch_shardings`.

  Every process passes the same global batch (the pipeline yields identical global batches on
  every host, see loop.py); each device receives only its slice.
  """
  shardings = batch_shardings(batch, mesh, leading)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    s = shardings[k]
    out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
  return out
