"""`mrm-jax evaluate`: benchmark metrics from a score file, or scoring and metrics in one go.

    mrm-jax evaluate --benchmark vl_rewardbench --data data.jsonl --scores scores.jsonl --output report.json
    mrm-jax evaluate --benchmark vl_rewardbench --data data.jsonl --model MODEL_DIR --image-root IMAGES
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from mrm_jax.cli_types import positive_int
from mrm_jax.errors import UserError
from mrm_jax.evaluate import benchmarks, metrics
from mrm_jax.io import check_distinct_paths, write_json

log = logging.getLogger(__name__)

MAX_NAMED_MISSING = 5


def add_arguments(parser) -> None:
  parser.add_argument("--benchmark", required=True, metavar="NAME",
                      help=f"one of: {', '.join(benchmarks.BENCHMARKS)} ('pairs' = any preference pair file)")
  parser.add_argument("--data", required=True, metavar="FILE",
                      help="the benchmark's release file (JSON list or JSON Lines)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--scores", metavar="SCORES.jsonl",
                      help='one {"chosen": float, "rejected": float} line per benchmark record, same order '
                      '(LLaMA-Factory\'s prediction format); an "id", if present, must match the record')
  source.add_argument("--model", metavar="DIR", help="score the benchmark with this reward model (HF-format directory)")
  parser.add_argument("--output", metavar="REPORT.json", help="write the report here (fractions in [0, 1])")
  group = parser.add_argument_group("scoring (with --model)")
  group.add_argument("--image-root", metavar="DIR", help="folder the benchmark's image paths are relative to "
                     "(default: the data file's folder, or the images a parquet release embeds)")
  group.add_argument("--batch-size", type=positive_int, default=8,
                     help="scoring records per batch (default 8)")
  group.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="compute dtype (default float32; parameters load in float32)")
  group.add_argument("--skip-missing", action="store_true",
                     help="evaluate the items whose images are present and report how many were skipped per "
                     "category (default: missing images are an error)")


def split_missing(items: list[benchmarks.BenchItem], image_root, skip_missing: bool):
  """(items to score, skipped items). Missing images are an error naming the first few files,
  unless `skip_missing`."""
  present, skipped, missing_files = [], [], []
  for item in items:
    missing = benchmarks.missing_media(item, image_root)
    if missing:
      skipped.append(item)
      missing_files += [f"{item.where}: {m}" for m in missing]
    else:
      present.append(item)
  if skipped and not skip_missing:
    named = "; ".join(missing_files[:MAX_NAMED_MISSING])
    more = f" (and {len(missing_files) - MAX_NAMED_MISSING} more)" if len(missing_files) > MAX_NAMED_MISSING else ""
    raise UserError(f"{len(missing_files)} image files missing under {image_root} in {len(skipped)} of {len(items)} "
                    f"items: {named}{more}; use --skip-missing to evaluate the rest")
  return present, skipped


def skipped_summary(skipped: list[benchmarks.BenchItem]) -> dict:
  counts = Counter(i.category for i in skipped)
  return {"n": len(skipped), "categories": dict(sorted(counts.items()))}


def score_items(items, image_root, model, processor, batch_size: int) -> list[tuple[float, float]]:
  """(chosen, rejected) scores per item, through the project's scoring path."""
  from mrm_jax.evaluate.scoring import score_records

  recs = []
  for item in items:
    recs.extend(benchmarks.scoring_records(item, image_root))
  sides = ("chosen", "rejected")
  scores = [float(s) for s in score_records(model, processor, recs, image_root, batch_size,
                                            where=lambda i: f"{items[i // 2].where} ({sides[i % 2]})")]
  return list(zip(scores[0::2], scores[1::2]))


def evaluate_model(name: str, items, model_dir, image_root, batch_size: int = 8, dtype: str = "float32",
                   skip_missing: bool = False) -> dict:
  """Scores a benchmark's items with a reward model and returns the report (with a `skipped`
  entry when items without images were left out)."""
  from mrm_jax.evaluate.score_cli import load_model_for_scoring

  present, skipped = split_missing(items, image_root, skip_missing)
  if not present:
    raise UserError(f"no item of the benchmark has its images under {image_root}")
  model, processor = load_model_for_scoring(str(model_dir), dtype=dtype)
  rep = metrics.report(name, present, score_items(present, image_root, model, processor, batch_size))
  if skipped:
    rep["skipped"] = skipped_summary(skipped)
  return rep


def run(args) -> int:
  import tempfile

  from mrm_jax.data.readers import ImageStore

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
      rep = metrics.report(args.benchmark, items, metrics.read_scores(args.scores, items, args.data))
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
      rep = evaluate_model(args.benchmark, items, args.model, image_root, args.batch_size, args.dtype,
                           args.skip_missing)
  print(metrics.format_table(args.benchmark, rep))
  if args.output:
    write_json(args.output, rep)
    log.info("wrote %s", args.output)
  return 0
