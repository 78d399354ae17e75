"""`mrm-jax convert`: a native dataset (DESIGN §3.3) → preference pairs.

Pair formats become canonical pairs (or LLaMA-Factory records with `--format llamafactory`).
The T2I formats (Pick-a-Pic, HPDv2, ImageReward) are read into T2I records and then given the
two-image reformulation of DESIGN §8 (`mrm_jax.construct.t2i`), so the output is a pair file in
either case. Embedded image bytes are extracted beside the output (`--image-dir`, default
`<output folder>/images`) under content-hashed names, and the output refers to them relative to
its own folder. A failed conversion leaves neither the output nor any image it extracted.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

FORMATS = ("canonical", "llamafactory", "rlaif_v", "vlfeedback", "mm_rlhf", "pickapic", "hpdv2", "imagereward",
           "vl_rewardbench", "multimodal_rewardbench", "mm_rlhf_rewardbench")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--input", required=True, help="the native dataset: a file, or a folder of its shards")
  parser.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="the input's native format")
  parser.add_argument("--output", required=True, help="the pair file to write (JSON Lines)")
  parser.add_argument("--format", default="canonical", choices=("canonical", "llamafactory"),
                      help="output record format (default: canonical pairs)")
  parser.add_argument("--image-dir", default=None,
                      help="where embedded image bytes are extracted (default: OUTPUT's folder/images); "
                      "must lie inside the output's folder, since records refer to images relative to it")
  parser.add_argument("--seed", type=int, default=42,
                      help="T2I formats only: seed of the balanced shuffle deciding which image is shown first")


def llamafactory_record(pair: dict) -> dict:
  """A canonical pair as LLaMA-Factory expects it: one `<image>` per image in the prompt.

  Records that already carry placeholders (everything LLaMA-Factory itself wrote) are left
  exactly as `to_llamafactory` makes them, so LLaMA-Factory → canonical → LLaMA-Factory is the
  identity; prompts without any (native datasets) get them prepended, as images go first.
  """
  from mrm_jax.data.records import IMAGE_PLACEHOLDER, to_llamafactory
  rec = to_llamafactory(pair)
  n = len(rec.get("images") or [])
  question = rec["conversations"][0]["value"]
  if n and IMAGE_PLACEHOLDER not in question:
    rec["conversations"][0]["value"] = IMAGE_PLACEHOLDER * n + question
  if pair.get("videos") and "videos" not in rec:
    rec["videos"] = list(pair["videos"])
  return rec




def convert(input_path, fmt: str, output, out_format: str = "canonical", image_dir=None, seed: int = 42) -> int:
  """Converts and writes atomically; returns the number of records written."""
  from tqdm import tqdm

  from mrm_jax.data import readers
  from mrm_jax.errors import UserError
  from mrm_jax.io import write_jsonl

  output = Path(output)
  out_dir = output.resolve().parent
  image_dir = Path(image_dir).resolve() if image_dir else out_dir / "images"
  if out_dir != image_dir and out_dir not in image_dir.parents:
    raise UserError(f"--image-dir {image_dir} must lie inside the output's folder {out_dir}")
  store = readers.ImageStore(image_dir, relative_to=out_dir)
  try:
    items = list(tqdm(readers.read(input_path, fmt, store), desc=f"convert {fmt}", unit=" rec", disable=None))
    records = [r for _, r in items]
    if fmt in readers.T2I_FORMATS:
      from mrm_jax.construct import t2i
      records = t2i.reformulate(records, seed=seed, wheres=[w for w, _ in items])
    if out_format == "llamafactory":
      records = [llamafactory_record(r) for r in records]
    n = write_jsonl(output, records)
  except BaseException:
    store.remove_created()
    raise
  log.info("wrote %d %s records to %s (%d new images in %s)", n, out_format, output, len(store.created), image_dir)
  return n


def run(args) -> int:
  from mrm_jax.io import check_distinct_paths
  check_distinct_paths({"--output": args.output}, {"--input": args.input})
  convert(args.input, args.fmt, args.output, args.format, args.image_dir, args.seed)
  return 0
