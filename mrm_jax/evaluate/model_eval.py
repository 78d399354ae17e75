"""Benchmark evaluation with a reward model: check the items' images, score both sides of every
item through the project's scoring path, and report the benchmark's metrics."""

from __future__ import annotations

from collections import Counter

from mrm_jax.errors import UserError
from mrm_jax.evaluate import benchmarks, metrics
from mrm_jax.evaluate.scoring import score_records
from mrm_jax.loading import load_model

MAX_NAMED_MISSING = 5


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
    more = (
      f" (and {len(missing_files) - MAX_NAMED_MISSING} more)"
      if len(missing_files) > MAX_NAMED_MISSING
      else ""
    )
    raise UserError(
      f"{len(missing_files)} image files missing under {image_root} in {len(skipped)} of "
      f"{len(items)} "
      f"items: {named}{more}; use --skip-missing to evaluate the rest"
    )
  return present, skipped


def skipped_summary(skipped: list[benchmarks.BenchItem]) -> dict:
  counts = Counter(i.category for i in skipped)
  return {"n": len(skipped), "categories": dict(sorted(counts.items()))}


def score_items(items, image_root, model, processor, batch_size: int) -> list[tuple[float, float]]:
  """(chosen, rejected) scores per item, through the project's scoring path."""
  recs = []
  for item in items:
    recs.extend(benchmarks.scoring_records(item, image_root))
  sides = ("chosen", "rejected")
  scores = [
    float(s)
    for s in score_records(
      model,
      processor,
      recs,
      image_root,
      batch_size,
      where=lambda i: f"{items[i // 2].where} ({sides[i % 2]})",
    )
  ]
  return list(zip(scores[0::2], scores[1::2]))


def evaluate_model(
  name: str,
  items,
  model_dir,
  image_root,
  batch_size: int = 8,
  dtype: str = "float32",
  skip_missing: bool = False,
  image_preprocess: str | None = None,
  template: str | None = None,
) -> dict:
  """Scores a benchmark's items with a reward model and returns the report (with a `skipped`
  entry when items without images were left out)."""
  present, skipped = split_missing(items, image_root, skip_missing)
  if not present:
    raise UserError(f"no item of the benchmark has its images under {image_root}")
  model, processor = load_model(
    model_dir, dtype=dtype, image_preprocess=image_preprocess, template=template
  )
  rep = metrics.report(
    name, present, score_items(present, image_root, model, processor, batch_size)
  )
  if skipped:
    rep["skipped"] = skipped_summary(skipped)
  return rep
