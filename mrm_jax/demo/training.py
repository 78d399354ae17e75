"""The embedded world as a training run's data: `mrm-jax train --config configs/demo.py --workdir W`
with no `data.train` trains the world's tiny reward model on what round 0 of the demo trains on.

    cfg = use_embedded_world(cfg, workdir)

WORKDIR/world is generated (or reused when its seed and settings match, as `mrm-jax demo` does),
its debiased pairs (`construct` on the stored judge outputs) and its T2I pairs (`t2i`) are written
to WORKDIR/world_pairs/, and the config is pointed at them: `model.path` = the world's model
directory (config + tokenizer, random init), `data.train` = the two pair files, `data.eval` = the
held-out pairs, `data.image_root` = the world. Everything written is a function of the seed and the
world settings, so a resumed run reads the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from mrm_jax.construct.pairs import construct_files
from mrm_jax.construct.t2i import read_generic, reformulate
from mrm_jax.curate.config import curate_config
from mrm_jax.demo.world import ensure_world, world_config
from mrm_jax.errors import UserError
from mrm_jax.io import write_jsonl

log = logging.getLogger(__name__)


def wants_embedded_world(cfg, init_from: str | None = None) -> bool:
  """True when the config names no training data: the embedded world supplies it (and the model,
  when none is named either)."""
  if cfg.data.train:
    return False
  if not (init_from or cfg.model.path) and (cfg.model.family, cfg.model.preset) != (
    "qwen2_vl",
    "tiny",
  ):
    raise UserError(
      "data.train is empty and so is model.path: set data.train (pair files) and model.path (an HF "
      "directory with the tokenizer); only the tiny Qwen2-VL of configs/demo.py trains on the "
      "embedded "
      f"world without them (this config asks for {cfg.model.family} preset '{cfg.model.preset}')"
    )
  return True


@dataclasses.dataclass(frozen=True)
class WorldPairs:
  files: dict[str, Path]  # "debiased", "t2i": the pair files
  counts: dict[str, int]  # pairs per file
  construct: dict  # the construction report (`construct --report`)


def write_world_pairs(
  world: Path,
  out_dir: Path,
  min_gap: float,
  t2i_seed: int,
  *,
  after_debiased: Callable[[], None] = lambda: None,
) -> WorldPairs:
  """The world's debiased pairs (`construct` on its stored judge outputs) and T2I pairs (`t2i`)
  in OUT_DIR, as the curation's `prepare` stage builds them. `after_debiased` runs between the
  two (the fault hook)."""
  pairs, stats = construct_files(
    world / "candidates.jsonl", world / "judgments.jsonl", float(min_gap)
  )
  files = {"debiased": out_dir / "debiased.jsonl", "t2i": out_dir / "t2i.jsonl"}
  counts = {"debiased": write_jsonl(files["debiased"], pairs)}
  after_debiased()
  records, wheres = read_generic(world / "t2i.jsonl")
  counts["t2i"] = write_jsonl(files["t2i"], reformulate(records, int(t2i_seed), wheres))
  return WorldPairs(files, counts, stats.report())


def use_embedded_world(cfg, workdir, *, primary: bool = True):
  """`cfg` with model.path (if empty), data.train, data.eval (if empty) and data.image_root set to
  the embedded world in WORKDIR. Only the primary process writes; the others must wait for it
  (`mrm_jax.distributed.barrier`) before reading."""
  workdir = Path(workdir)
  if "world" not in cfg:
    cfg.world = world_config()
  curate = cfg.curate if "curate" in cfg else curate_config()
  world, pair_dir = workdir / "world", workdir / "world_pairs"
  if primary:
    world, stats, reused = ensure_world(workdir, cfg)
    files = write_world_pairs(world, pair_dir, curate.min_gap, curate.t2i_seed).files
    log.info(
      "data.train is empty: training on the embedded world (%s, seed %d, size %s): %s",
      "reused" if reused else "generated",
      stats["seed"],
      cfg.world.size,
      ", ".join(str(f) for f in files.values()),
    )
  cfg.model.path = cfg.model.path or str(world / "model")
  cfg.data.train = ",".join(str(pair_dir / f"{name}.jsonl") for name in ("debiased", "t2i"))
  cfg.data.eval = cfg.data.eval or str(world / "heldout_pairs.jsonl")
  cfg.data.image_root = str(world)
  return cfg
