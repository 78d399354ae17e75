"""`mrm-jax curate <step>`: the iterative-curation steps as commands (DESIGN §3.1, §3.2b, §9).

    mrm-jax curate flip   --pairs P --scores S [S ...] --output OUT [--flip-fraction 0.5]
    mrm-jax curate filter --pairs P --scores S [S ...] --output OUT --inconsistent QUEUE
    mrm-jax curate vote   --queue QUEUE --judgments J [J ...] --output OUT [--min-votes 2]
    mrm-jax curate run    --config CFG --workdir DIR [--config.curate.KEY=VALUE ...]

A step is one entry of STEPS: a function adding its arguments, a function running it, and its
help. `run` resolves the config's inputs and judge (the embedded world's, when the config names
it: mrm_jax/demo/curation.py) and runs the library's loop (mrm_jax/curate/loop.py).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable

from mrm_jax import distributed
from mrm_jax.cli_types import fraction, positive_int
from mrm_jax.config import load_config
from mrm_jax.curate import steps
from mrm_jax.curate.training import enable_compilation_cache
from mrm_jax.data.records import iter_pairs, read_judgments
from mrm_jax.demo.curation import run_curation
from mrm_jax.errors import UserError, at
from mrm_jax.io import atomic_outputs, check_distinct_paths, check_writable_dir, write_jsonl

# Steps that take `--config.KEY=VALUE` overrides get them as `args.overrides`; the others refuse
# them.
ACCEPTS_CONFIG_OVERRIDES = True


@dataclasses.dataclass
class Step:
  add_arguments: Callable
  run: Callable
  help: str
  accepts_overrides: bool = False


def _read_pairs(path) -> tuple[list[dict], list[str]]:
  """Pairs (canonical or LLaMA-Factory) and their file:line."""
  wheres, pairs = [], []
  for n, pair in iter_pairs(path):
    wheres.append(at(path, n))
    pairs.append(pair)
  return pairs, wheres


def _report_missing(
  step: str, missing: list[steps.Missing], wheres: list[str], score_files: list[str]
) -> None:
  """Lists the pairs left out for a missing score, with the count, on stderr."""
  if not missing:
    return
  print(f"curate {step}: left out {len(missing)} pair(s) missing a score:", file=sys.stderr)
  for m in missing:
    files = ", ".join(str(score_files[k]) for k in m.files)
    print(f"  {wheres[m.index]} id={m.pair_id!r} (no score in {files})", file=sys.stderr)


# ----------------------------------------------------------------------------- flip


def add_flip_arguments(p) -> None:
  p.add_argument(
    "--pairs",
    required=True,
    metavar="P",
    help="noisy preference pairs (canonical or LLaMA-Factory)",
  )
  p.add_argument(
    "--scores",
    required=True,
    nargs="+",
    metavar="S",
    help='one curation score file per scorer: JSONL {"images", "question", "answer", "score"}',
  )
  p.add_argument(
    "--output", required=True, metavar="OUT", help="all scored pairs, in input order, some flipped"
  )
  p.add_argument(
    "--flip-fraction",
    type=fraction,
    default=0.5,
    help="share of the negative-strength pairs (most negative first) to flip (default 0.5)",
  )


def run_flip(args) -> int:
  check_distinct_paths({"--output": args.output}, {"--pairs": args.pairs, "--scores": args.scores})
  pairs, wheres = _read_pairs(args.pairs)
  tables = [steps.read_score_file(s) for s in args.scores]
  out, missing = steps.flip(pairs, tables, args.flip_fraction)
  _report_missing("flip", missing, wheres, args.scores)
  write_jsonl(args.output, out)
  n_neg = sum(1 for p in out if p["strength"] < 0 or p.get("flipped"))
  n_flipped = sum(1 for p in out if p.get("flipped"))
  print(
    f"curate flip: {len(out)} pairs written to {args.output}; {n_neg} with negative strength, "
    f"{n_flipped} flipped; {len(missing)} left out for a missing score"
  )
  return 0


# ----------------------------------------------------------------------------- filter


def add_filter_arguments(p) -> None:
  p.add_argument(
    "--pairs", required=True, metavar="P", help="pairs to check (canonical or LLaMA-Factory)"
  )
  p.add_argument(
    "--scores",
    required=True,
    nargs="+",
    metavar="S",
    help="curation score file(s) of the retrained model (several: their scores are averaged)",
  )
  p.add_argument(
    "--output", required=True, metavar="OUT", help="pairs the model agrees with (chosen > rejected)"
  )
  p.add_argument(
    "--inconsistent",
    required=True,
    metavar="QUEUE",
    help="re-annotation queue: the other pairs, labelled as they came",
  )


def run_filter(args) -> int:
  check_distinct_paths(
    {"--output": args.output, "--inconsistent": args.inconsistent},
    {"--pairs": args.pairs, "--scores": args.scores},
  )
  pairs, wheres = _read_pairs(args.pairs)
  tables = [steps.read_score_file(s) for s in args.scores]
  kept, queue, missing = steps.filter_consistent(pairs, tables)
  _report_missing("filter", missing, wheres, args.scores)
  with atomic_outputs():  # the kept pairs and the queue are replaced together or not at all
    write_jsonl(args.output, kept)
    write_jsonl(args.inconsistent, queue)
  print(
    f"curate filter: {len(kept)} pairs kept in {args.output}, {len(queue)} queued in "
    f"{args.inconsistent}; "
    f"{len(missing)} left out for a missing score"
  )
  return 0


# ----------------------------------------------------------------------------- vote


def add_vote_arguments(p) -> None:
  p.add_argument(
    "--queue", required=True, metavar="Q", help="the re-annotation queue written by `curate filter`"
  )
  p.add_argument(
    "--judgments",
    required=True,
    nargs="+",
    metavar="J",
    help="pairwise judgment files (`mrm-jax judge --mode pairwise --input Q`)",
  )
  p.add_argument(
    "--output", required=True, metavar="OUT", help="re-annotated pairs kept by majority vote"
  )
  p.add_argument(
    "--min-votes",
    type=positive_int,
    default=2,
    help="valid judgments a pair needs to be kept (default 2)",
  )


def run_vote(args) -> int:
  check_distinct_paths(
    {"--output": args.output}, {"--queue": args.queue, "--judgments": args.judgments}
  )
  queue, wheres = _read_pairs(args.queue)
  steps.check_unique_ids(list(zip(wheres, queue)))
  judgments = [j for path in args.judgments for j in read_judgments(path)]
  result = steps.vote(queue, judgments, args.min_votes)
  write_jsonl(args.output, result.kept)
  swapped = sum(1 for p in result.kept if p["meta"]["vote"]["swapped"])
  if result.unknown:
    print(
      f"curate vote: ignored {len(result.unknown)} judgment(s) of pairs not in {args.queue} "
      f"(first: {', '.join(repr(i) for i in result.unknown[:5])})",
      file=sys.stderr,
    )
  print(
    f"curate vote: {len(result.kept)} of {len(queue)} pairs kept in {args.output} ({swapped} "
    "relabelled); "
    f"dropped {len(result.no_quorum)} with fewer than {args.min_votes} valid judgments and "
    f"{len(result.tied)} tied; {result.invalid} invalid judgment(s) not counted"
  )
  return 0


# ----------------------------------------------------------------------------- run


def add_run_arguments(p) -> None:
  p.description = (
    "The whole iterative curation (DESIGN §9): per round, score the pairs with the current reward "
    "model, flip the most confidently mislabelled ones, retrain on base + flipped data, keep the "
    "pairs the new model agrees with, have a judge re-annotate the rest in both orders, vote, and "
    "merge into the next round's pairs. Every stage leaves its outputs and a manifest under "
    "WORKDIR/round_R/STAGE/; rerunning the same command resumes at the first unfinished stage. "
    "Settings live in the config's `curate` section (override with --config.curate.KEY=VALUE)."
  )
  p.add_argument(
    "--config",
    required=True,
    metavar="CFG",
    help="config file with a `curate` section (e.g. configs/curate_demo.py)",
  )
  p.add_argument(
    "--workdir",
    required=True,
    metavar="DIR",
    help="run directory (created if missing; resumed if not)",
  )
  p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
  distributed.add_arguments(p)


def run_loop(args) -> int:
  if not getattr(args, "verbose", False):
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
  cfg = load_config(args.config, getattr(args, "overrides", []))
  if "curate" not in cfg:
    raise UserError(
      f"{args.config}: the config has no 'curate' section (add `c.curate = curate_config()`)"
    )
  distributed.initialize(args)
  workdir = check_writable_dir(args.workdir)
  if cfg.curate.compilation_cache:
    enable_compilation_cache(workdir / "jax_cache")
  run_curation(cfg, workdir, progress=args.progress)
  return 0


STEPS: dict[str, Step] = {
  "flip": Step(
    add_flip_arguments,
    run_flip,
    "step 1: flip the most confidently mislabelled pairs (strength from one or more scorers)",
  ),
  "filter": Step(
    add_filter_arguments,
    run_filter,
    "step 2: keep pairs the retrained model agrees with; queue the others for re-annotation",
  ),
  "vote": Step(
    add_vote_arguments,
    run_vote,
    "step 3: keep queued pairs with enough valid judge votes and a strict majority",
  ),
  "run": Step(
    add_run_arguments,
    run_loop,
    "the whole iterative loop from a config (score, flip, retrain, filter, re-annotate, merge; "
    "resumable at any stage)",
    accepts_overrides=True,
  ),
}


def add_arguments(parser) -> None:
  sub = parser.add_subparsers(dest="step", metavar="<step>", required=True)
  for name, step in STEPS.items():
    p = sub.add_parser(name, help=step.help, description=step.help)
    step.add_arguments(p)
    p.set_defaults(_step=name)


def run(args) -> int:
  step = STEPS[args._step]
  extra = getattr(args, "overrides", None) or []
  if extra and not step.accepts_overrides:
    raise UserError(f"unrecognized arguments: {' '.join(extra)}")
  return step.run(args)
