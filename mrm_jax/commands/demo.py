"""`mrm-jax demo`: the whole pipeline on the embedded synthetic world (DESIGN §3.1, §11).

    mrm-jax demo --workdir runs/demo [--size small|full] [--seed N] [--config.KEY=VALUE ...]

Generates the world into WORKDIR/world (see mrm_jax/demo/world.py for its layout), builds the
debiased and T2I pairs, trains the round-0 reward model, curates the noisy pairs round by round
and evaluates every model on the held-out split (mrm_jax/demo/pipeline.py); leaves
WORKDIR/summary.json, PNG plots beside it, and prints a summary table. Rerunning the same command
resumes where a killed run stopped. `--world-only` just writes the world and prints its statistics.

The world is built in a staging directory and renamed into place when complete, so a killed run
never leaves half a world; a world already there with the same seed and settings is reused.
"""

from __future__ import annotations

import logging

from mrm_jax.demo.config import load_demo_config
from mrm_jax.demo.pipeline import run_demo
from mrm_jax.demo.world import ensure_world
from mrm_jax.io import check_writable_dir

ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(parser):
  parser.description = (
    "The whole DT2IT-MRM pipeline on the embedded synthetic world, on CPU: generate the world, "
    "construct "
    "debiased pairs from its stored judge outputs, reformulate its T2I pairs, train the round-0 "
    "reward "
    "model, curate the noisy pairs (score, flip, retrain, filter, re-annotate with a simulated "
    "judge, vote, "
    "merge) for curate.rounds rounds, and evaluate every model on the held-out split. Writes "
    "WORKDIR/summary.json (round0_heldout_accuracy, heldout_accuracy, noise_precision, "
    "noise_recall, "
    "seconds, ...), PNG plots beside it, and prints a summary table. Rerun the same command to "
    "resume."
  )
  parser.add_argument(
    "--workdir",
    default="runs/demo",
    help="directory for the world and the run's outputs; "
    "an existing one is resumed (default: ./runs/demo)",
  )
  parser.add_argument(
    "--config",
    default="curate_demo",
    help="config file (default: configs/curate_demo.py, "
    "the training settings of configs/demo.py plus the curation settings); override any key "
    "with --config.KEY=VALUE, e.g. --config.world.flip_fraction=0.3 --config.curate.rounds=1",
  )
  parser.add_argument(
    "--seed", type=int, default=None, help="seed of the world and the run (config key `seed`)"
  )
  parser.add_argument(
    "--size",
    choices=("small", "full"),
    default="full",
    help="world size: small (for tests and a quick look) or full (the demo, default); "
    "config key `world.size`",
  )
  parser.add_argument(
    "--world-only",
    action="store_true",
    help="only write the world (or reuse it) and print its statistics",
  )
  parser.add_argument(
    "--no-progress", dest="progress", action="store_false", help="no progress bars"
  )


def world_table(stats: dict) -> str:
  j, noisy, held = stats["judgments"], stats["noisy"], stats["heldout"]
  kinds = ", ".join(f"{k} {v}" for k, v in j["kinds"].items() if k != "clean")
  types = ", ".join(f"{k} {v}" for k, v in held["types"].items())
  rows = [
    ("seed", str(stats["seed"]), f"size {stats['config']['size']}"),
    ("images", str(stats["images"]), f"{stats['image_size']}x{stats['image_size']} PNG"),
    (
      "candidate sets",
      str(stats["candidates"]["n"]),
      f"{stats['candidates']['responses']} responses",
    ),
    ("judge outputs", str(j["n"]), f"{j['valid']} parse ({j['n'] - j['valid']} invalid); {kinds}"),
    ("T2I pairs", str(stats["t2i"]["n"]), "matching vs one-attribute-off image"),
    (
      "noisy pairs",
      str(noisy["n"]),
      f"{noisy['flipped']} flipped ({noisy['flip_fraction']:.0%}); "
      f"chosen longer {noisy['chosen_longer_share']:.0%}",
    ),
    ("held-out pairs", str(held["n"]), types),
    (
      "tokenizer",
      str(stats["model"]["tokens"]),
      f"tokens (embedding rows {stats['model']['vocab_size']})",
    ),
  ]
  w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
  return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


def run(args) -> int:
  if not args.world_only:
    if not getattr(args, "verbose", False):
      logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    run_demo(
      args.workdir,
      size=args.size,
      seed=args.seed,
      overrides=getattr(args, "overrides", []),
      config=args.config,
      progress=args.progress,
    )
    return 0
  cfg = load_demo_config(args.config, getattr(args, "overrides", []), args.seed, args.size)
  workdir = check_writable_dir(args.workdir)
  path, stats, reused = ensure_world(workdir, cfg)
  print(f"world {'reused' if reused else 'written'}: {path}")
  print(world_table(stats))
  return 0
