"""Mesh creation and the ONE mapping from logical axis names to mesh axes.

Models annotate parameters with logical names (`"embed"`, `"mlp"`, `"heads"`, ...; see
docs/internals.md). Only this module knows how those names land on the physical mesh
`("data", "fsdp", "tensor")`, MaxText-style: change the rules here and every model follows.
A dimension whose size does not divide evenly by its mesh axis is replicated instead of
failing, so tiny test models and odd head counts run on any mesh.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mrm_jax.errors import UserError
from mrm_jax.models import vision_layout

log = logging.getLogger(__name__)

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


def put_batch(
  batch: Mapping[str, Any], mesh: Mesh, leading: int = 0, block: tuple[int, int] = (0, 1)
) -> dict:
  """Host batch (numpy) → global jax arrays laid out by `batch_shardings`.

  `block = (index, count)` (see `process_block`): with count 1 every process passes the same
  global batch and each device receives only its slice; otherwise the process passes only its
  block (`offset_block` applied, shapes common to all processes) and `join_blocks` assembles them.
  """
  if block[1] > 1:
    return join_blocks(batch, mesh, leading, block[1])
  shardings = batch_shardings(batch, mesh, leading)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    s = shardings[k]
    out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
  return out


# -- the global batch from the processes' blocks ---------------------------------------------------
#
# With several processes each one encodes only the pairs of its own devices (the lanes of
# mrm_jax/data/pipeline.py) and collates them into its block, a batch of its own. The global batch
# concatenates the blocks, in block order, along each array's row axis (`ROW_AXIS`; axis 0 for the
# others: patches, vision items). Two things make the concatenation a valid batch:
# - host-computed indices point into the whole array: `offset_block` shifts each block's by the
#   sizes of the blocks before it (the blocks have equal shapes, so that is index x size);
# - with two rows per pair, a block holds [chosen..., rejected...]; `join_blocks` reorders the
#   rows to [chosen of every block..., rejected of every block...], the layout `pair_loss` reads.
# An array this module does not know is concatenated on axis 0 unchanged (right for per-row arrays
# that hold no index into another array).


def process_block(mesh: Mesh) -> tuple[int, int]:
  """`(index, count)`: the block of the global batch this process feeds, and how many blocks
  (see `batch_blocks`); `(0, 1)` for a single process."""
  if jax.process_count() == 1:
    return 0, 1
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  owners = np.vectorize(lambda d: d.process_index)(np.asarray(mesh.devices).reshape(n, -1))
  block = batch_blocks(owners, jax.process_index())
  if block is None:
    log.warning(
      "the mesh interleaves processes along its batch axes: every process encodes the whole "
      "global batch"
    )
    return 0, 1
  return block


def batch_blocks(owners: np.ndarray, process: int) -> tuple[int, int] | None:
  """`(index, count)` of `process`'s block given the process of each device, `owners [batch
  position, tensor]` (batch positions: the (data, fsdp) grid in mesh order).

  A block is a contiguous run of batch positions: every process must touch one such run, all runs
  of one size, aligned, so that block i's devices are exactly the processes that feed it (several
  when the tensor axis spans processes: they feed the same block). None when the mesh interleaves
  processes along the batch axes.
  """
  runs = {}
  for p in np.unique(owners):
    positions = np.flatnonzero((owners == p).any(axis=1))
    runs[int(p)] = positions
  size = len(runs[process])
  for positions in runs.values():
    first = int(positions[0])
    if len(positions) != size or first % size or positions[-1] != first + size - 1:
      return None
  return int(runs[process][0]) // size, owners.shape[0] // size


def offset_block(batch: Mapping[str, Any], index: int, patch_unit: int) -> dict:
  """A collated batch's host-computed indices shifted for block `index` of equal-shaped blocks:
  vision segment ids (kept unique), the per-item attention layouts' patch indices and rows, and
  `vision_token_offset` (merged vision tokens: `patch_unit` = merge_size² patches each)."""
  out = dict(batch)
  if index == 0 or "pixel_values" not in batch:
    return out
  patches = np.shape(batch["pixel_values"])[0]
  for k, v in batch.items():
    if k.endswith("_segment_ids"):
      v = np.asarray(v)
      out[k] = np.where(v > 0, v + index * patches, 0).astype(v.dtype)
  for prefix in vision_layout.LAYOUTS.values():
    if f"{prefix}_index" not in batch:
      continue
    rows = np.shape(batch[f"{prefix}_index"])[0]
    out[f"{prefix}_index"] = np.asarray(batch[f"{prefix}_index"]) + index * patches
    slot = np.array(batch[f"{prefix}_slot"])
    slot[:, 0] += index * rows
    out[f"{prefix}_slot"] = slot
  if "vision_token_offset" in batch:
    out["vision_token_offset"] = np.asarray(batch["vision_token_offset"]) + index * (
      patches // patch_unit
    )
  return out


def block_mesh(mesh: Mesh, count: int) -> Mesh:
  """`mesh`'s devices in the same order as `count` blocks ("blocks" axis) of devices: block i's
  devices are those of the processes that feed it (see `process_block`)."""
  return Mesh(np.asarray(mesh.devices).reshape(count, -1), ("blocks", "within"))


def _pair_rows(shapes: Mapping[str, tuple], leading: int, count: int) -> np.ndarray | None:
  """The global row order [chosen of every block..., rejected of every block...] as indices into
  the joined blocks, when a block holds two rows per pair (None otherwise: one row per pair)."""
  if "input_ids" not in shapes or "strength" not in shapes:
    return None
  rows = shapes["input_ids"][leading] // count
  pairs = shapes["strength"][leading] // count
  if rows != 2 * pairs:
    return None
  chosen = (np.arange(count)[:, None] * rows + np.arange(pairs)).ravel()
  return np.concatenate([chosen, chosen + pairs]).astype(np.int32)


@functools.lru_cache(maxsize=64)
def _joiner(mesh: Mesh, leading: int, count: int, shapes: tuple):
  """The jitted reorder + reshard from joined blocks to `batch_shardings`, per batch structure."""
  shapes = dict(shapes)
  order = _pair_rows({k: s for k, (s, _) in shapes.items()}, leading, count)
  targets = batch_shardings(
    {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}, mesh, leading
  )

  def join(arrays):
    out = {}
    for k, v in arrays.items():
      axis = leading + ROW_AXIS.get(k, 0)
      per_row = k in ROW_KEYS or k == "vision_token_offset"
      if order is not None and per_row and v.shape[axis] == order.shape[0]:
        v = jnp.take(v, order, axis=axis)
      out[k] = v
    return out

  return jax.jit(join, out_shardings=targets)


def join_blocks(batch: Mapping[str, Any], mesh: Mesh, leading: int, count: int) -> dict:
  """This process's block of every batch array → the global arrays (see the notes above)."""
  blocks = block_mesh(mesh, count)
  arrays = {}
  for k, v in batch.items():
    v = np.asarray(v)
    axis = leading + ROW_AXIS.get(k, 0)
    if v.ndim <= axis:
      raise ValueError(f"batch array '{k}' {v.shape} has no axis {axis} to join blocks on")
    spec = [None] * v.ndim
    spec[axis] = "blocks"
    shape = list(v.shape)
    shape[axis] *= count
    sharding = NamedSharding(blocks, PartitionSpec(*spec))
    arrays[k] = jax.make_array_from_process_local_data(sharding, v, tuple(shape))
  key = tuple(sorted((k, (tuple(a.shape), a.dtype)) for k, a in arrays.items()))
  return _joiner(mesh, leading, count, key)(arrays)
