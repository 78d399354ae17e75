"""`mrm-jax evaluate`: benchmark metrics from a score file, or scoring and metrics in one go.

mrm-jax evaluate --benchmark vl_rewardbench --data data.jsonl --scores scores.jsonl --output
report.json mrm-jax evaluate --benchmark vl_rewardbench --data data.jsonl --model MODEL_DIR
--image-root IMAGES
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mrm_jax.cli_types import add_processing_arguments, positive_int
from mrm_jax.data.readers import ImageStore
from mrm_jax.errors import UserError
from mrm_jax.evaluate import benchmarks, metrics
from mrm_jax.io import check_distinct_paths, write_json

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
  parser.add_argument(
    "--benchmark",
    required=True,
    metavar="NAME",
    help=f"one of: {', '.join(benchmarks.BENCHMARKS)} ('pairs' = any preference pair file)",
  )
  parser.add_argument(
    "--data",
    required=True,
    metavar="FILE",
    help="the benchmark's release file (JSON list or JSON Lines)",
  )
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument(
    "--scores",
    metavar="SCORES.jsonl",
    help='one {"chosen": float, "rejected": float} line per benchmark record, same order '
    '(LLaMA-Factory\'s prediction format); an "id", if present, must match the record',
  )
  source.add_argument(
    "--model",
    metavar="DIR",
    help="score the benchmark with this reward model (HF-format directory or training workdir)",
  )
  parser.add_argument(
    "--output", metavar="REPORT.json", help="write the report here (fractions in [0, 1])"
  )
  group = parser.add_argument_group("scoring (with --model)")
  group.add_argument(
    "--image-root",
    metavar="DIR",
    help="folder the benchmark's image paths are relative to "
    "(default: the data file's folder, or the images a parquet release embeds)",
  )
  group.add_argument(
    "--batch-size", type=positive_int, default=8, help="scoring records per batch (default 8)"
  )
  group.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="compute dtype (default float32; parameters load in float32)",
  )
  group.add_argument(
    "--skip-missing",
    action="store_true",
    help="evaluate the items whose images are present and report how many were skipped per "
    "category (default: missing images are an error)",
  )
  add_processing_arguments(group)


def run(args) -> int:
  benchmarks.check_name(args.benchmark)
  if args.output:
    check_distinct_paths({"--output": args.output}, {"--data": args.data, "--scores": args.scores})
  # Parquet releases embed their images: they are extracted to a temporary folder for the run.
  with tempfile.TemporaryDirectory(prefix="mrm-evaluate-") as tmp:
    store = ImageStore(tmp, tmp)
    items = benchmarks.load(args.benchmark, args.data, images=store)
    if not items:
      raise UserError(f"{args.data}: no records")
    if args.scores:
      rep = metrics.report(
        args.benchmark, items, metrics.read_scores(args.scores, items, args.data)
      )
    else:
      if store.created:
        if args.image_root:
          log.warning("%s embeds its images; --image-root is not used", args.data)
        image_root = Path(tmp)
      elif args.image_root:
        image_root = Path(args.image_root)
      else:
        image_root = Path(args.data).resolve().parent
      if not image_root.is_dir():
        raise UserError(f"{image_root}: image root is not a directory")
      from mrm_jax.evaluate.model_eval import evaluate_model  # jax only when a model is scored

      rep = evaluate_model(
        args.benchmark,
        items,
        args.model,
        image_root,
        args.batch_size,
        args.dtype,
        args.skip_missing,
        image_preprocess=args.image_preprocess,
        template=args.template,
      )
  print(metrics.format_table(args.benchmark, rep))
  if args.output:
    write_json(args.output, rep)
    log.info("wrote %s", args.output)
  return 0
