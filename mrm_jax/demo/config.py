"""The demo's config: configs/demo.py or configs/curate_demo.py, completed with the world and
curation sections they leave out, then the command line's seed, size and overrides."""

from __future__ import annotations

from mrm_jax.config import apply_overrides, load_config_file
from mrm_jax.curate.config import curate_config
from mrm_jax.demo.world import world_config


def load_demo_config(
  spec: str = "demo",
  overrides: list[str] | None = None,
  seed: int | None = None,
  size: str | None = None,
):
  """The demo config: the config file, a `world` and a `curate` section if it has none, flags, then
  overrides."""
  cfg = load_config_file(spec)
  if "world" not in cfg:
    cfg.world = world_config()
  if "curate" not in cfg:
    cfg.curate = curate_config()
  if seed is not None:
    cfg.seed = seed
  if size is not None:
    cfg.world.size = size
  return apply_overrides(cfg, list(overrides or []))
