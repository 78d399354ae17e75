"""Mesh shapes and batch layouts for common machines, applied as `configs/X.py:TOPOLOGY`.

The global batch stays at the paper's 512 pairs per optimizer step everywhere; what changes
per machine is how the devices are split between data parallelism and FSDP, and how many
micro-batches are accumulated so each device holds `per_device_pairs` pairs at a time.
"""

from __future__ import annotations

import dataclasses

from mrm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Topology:
  description: str
  hosts: int
  devices: int  # accelerator devices (TPU chips / GPUs) in all
  mesh: tuple[int, int, int]  # (data, fsdp, tensor)
  per_device_pairs: int  # pairs per device per micro-batch
  global_pairs: int = 512  # pairs per optimizer step (paper: 512)

  @property
  def grad_accum(self) -> int:
    return self.global_pairs // (self.devices * self.per_device_pairs)


TOPOLOGIES = {
  # TPU v5p-64: 32 chips (95 GB HBM each) on 8 hosts. An 8B model plus AdamW fits with pure FSDP.
  "v5p-64": Topology(
    "TPU v5p-64 (32 chips, 8 hosts)", hosts=8, devices=32, mesh=(1, 32, 1), per_device_pairs=4
  ),
  # TPU v5e-256: 256 chips (16 GB HBM each) on 64 hosts: FSDP within 16-chip groups, data parallel
  # across.
  "v5e-256": Topology(
    "TPU v5e-256 (256 chips, 64 hosts)", hosts=64, devices=256, mesh=(16, 16, 1), per_device_pairs=1
  ),
  # One node of 8 H100/H200 GPUs: FSDP over NVLink.
  "h200x8": Topology(
    "1 node x 8 H100/H200", hosts=1, devices=8, mesh=(1, 8, 1), per_device_pairs=8
  ),
  # Four such nodes: FSDP inside a node (NVLink), data parallel across nodes (InfiniBand).
  "h200x8x4": Topology(
    "4 nodes x 8 H100/H200", hosts=4, devices=32, mesh=(4, 8, 1), per_device_pairs=4
  ),
}


def apply_topology(cfg, name: str):
  """Sets mesh, global batch and gradient accumulation of `cfg` for the named machine."""
  if name not in TOPOLOGIES:
    raise UserError(f"unknown topology '{name}' (known: {', '.join(TOPOLOGIES)})")
  t = TOPOLOGIES[name]
  data, fsdp, tensor = t.mesh
  assert data * fsdp * tensor == t.devices, name
  assert t.global_pairs % (t.devices * t.per_device_pairs) == 0, name
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
  cfg.train.batch_size = t.global_pairs
  cfg.train.grad_accum = t.grad_accum
  return cfg
