"""`mrm-jax train`: train (or resume) a reward model from a config file."""

from __future__ import annotations

import json
import os

ACCEPTS_CONFIG_OVERRIDES = True

DETERMINISTIC_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_autotune_level=0")


def add_arguments(parser) -> None:
  parser.description = (
    "Train a reward model (Bradley-Terry pair loss) on a (data, fsdp, tensor) device mesh. "
    "A WORKDIR that already holds checkpoints is resumed from the latest one. Writes "
    "WORKDIR/metrics.jsonl, WORKDIR/checkpoints/, WORKDIR/manifest.json and TensorBoard events. "
    "Override any config key with --config.KEY=VALUE (e.g. --config.train.num_steps=200). With "
    "data.train empty (configs/demo.py) it trains the tiny demo model on the embedded world, "
    "generated "
    "into WORKDIR/world, and evaluates it on the world's held-out pairs."
  )
  parser.add_argument(
    "--config",
    required=True,
    metavar="CFG",
    help="config file (path/to/cfg.py[:arg] or a name in configs/, e.g. qwen2_vl_2b)",
  )
  parser.add_argument(
    "--workdir", required=True, metavar="DIR", help="run directory (created if missing)"
  )
  parser.add_argument(
    "--init_from",
    default=None,
    metavar="HF_DIR",
    help="start from the weights of this HF-format directory (default: config model.path, "
    "else random init from model.preset)",
  )
  parser.add_argument(
    "--deterministic",
    action="store_true",
    help="set XLA's deterministic-ops flags (bit-identical reruns on GPU; a little slower)",
  )
  parser.add_argument(
    "--no-progress", dest="progress", action="store_false", help="no tqdm progress bar"
  )
  from mrm_jax import distributed

  distributed.add_arguments(parser)


def set_deterministic_flags() -> None:
  """Must run before JAX starts its backend (flags are read once)."""
  flags = os.environ.get("XLA_FLAGS", "")
  for f in DETERMINISTIC_XLA_FLAGS:
    if f.split("=")[0] not in flags:
      flags = f"{flags} {f}".strip()
  os.environ["XLA_FLAGS"] = flags
  os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")


def run(args) -> int:
  import logging

  if not getattr(args, "verbose", False):
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  from mrm_jax.config import load_config

  cfg = load_config(args.config, getattr(args, "overrides", []))
  if args.deterministic:
    set_deterministic_flags()
  from mrm_jax import distributed

  distributed.initialize(args)
  import jax

  from mrm_jax.demo.training import use_embedded_world, wants_embedded_world

  if wants_embedded_world(cfg, args.init_from):
    cfg = use_embedded_world(cfg, args.workdir, primary=jax.process_index() == 0)
    distributed.barrier("train:embedded-world")
  from mrm_jax.train.loop import train

  summary = train(cfg, args.workdir, init_from=args.init_from, progress=args.progress)
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2))
  return 0
