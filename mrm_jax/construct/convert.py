"""Native datasets (DESIGN §3.3) → preference pair files.

Pair formats become canonical pairs (or LLaMA-Factory records). The T2I formats (Pick-a-Pic, HPDv2,
ImageReward) are read into T2I records and then given the two-image reformulation of DESIGN §8
(`mrm_jax.construct.t2i`), so the output is a pair file in either case. Embedded image bytes are
extracted beside the output (default `<output folder>/images`) under content-hashed names, and the
output refers to them relative to its own folder; so it does to image paths the input gives
(relative to the input's folder), refusing an image outside the output's folder. A failed
conversion leaves neither the output nor any image it extracted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from mrm_jax.construct import t2i
from mrm_jax.data import readers
from mrm_jax.data.records import llamafactory_record, rebase_images
from mrm_jax.errors import UserError
from mrm_jax.io import write_jsonl

FORMATS = (
  "canonical",
  "llamafactory",
  "rlaif_v",
  "vlfeedback",
  "mm_rlhf",
  "pickapic",
  "hpdv2",
  "imagereward",
  "vl_rewardbench",
  "multimodal_rewardbench",
  "mm_rlhf_rewardbench",
)
OUTPUT_FORMATS = ("canonical", "llamafactory")

log = logging.getLogger(__name__)


def write_pairs(
  path, pairs: list[dict], fmt: str = "canonical", source_root=None, keep=frozenset()
) -> int:
  """Writes canonical `pairs` atomically as `fmt` records; returns how many. Image paths relative
  to `source_root` (the input's folder) are rebased onto the output's folder (`rebase_images`)."""
  if source_root is not None:
    pairs = rebase_images(pairs, source_root, path, keep)
  if fmt == "llamafactory":
    pairs = [llamafactory_record(p) for p in pairs]
  return write_jsonl(path, pairs)


def convert(
  input_path, fmt: str, output, out_format: str = "canonical", image_dir=None, seed: int = 42
) -> int:
  """Converts and writes atomically; returns the number of records written."""
  output = Path(output)
  out_dir = output.resolve().parent
  image_dir = Path(image_dir).resolve() if image_dir else out_dir / "images"
  if out_dir != image_dir and out_dir not in image_dir.parents:
    raise UserError(f"--image-dir {image_dir} must lie inside the output's folder {out_dir}")
  store = readers.ImageStore(image_dir, relative_to=out_dir)
  try:
    items = list(
      tqdm(readers.read(input_path, fmt, store), desc=f"convert {fmt}", unit=" rec", disable=None)
    )
    records = [r for _, r in items]
    if fmt in readers.T2I_FORMATS:
      records = t2i.reformulate(records, seed=seed, wheres=[w for w, _ in items])
    source = Path(input_path) if Path(input_path).is_dir() else Path(input_path).parent
    n = write_pairs(output, records, out_format, source, keep=store.returned)
  except BaseException:
    store.remove_created()
    raise
  log.info(
    "wrote %d %s records to %s (%d new images in %s)",
    n,
    out_format,
    output,
    len(store.created),
    image_dir,
  )
  return n
