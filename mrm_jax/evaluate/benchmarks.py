"""Benchmark adapters: each benchmark's release file → `BenchItem`s (one preference pair
with its category), the unit the metrics and the scorer work on (DESIGN §3.3, §10).

The adapters fix the two things every benchmark says differently: which response is
"chosen" (VL-RewardBench: the one `human_ranking` ranks first; Multimodal RewardBench:
the output named by `Better`; MM-RLHF-RewardBench and pair files: `chosen`) and which
category an item counts in. Score files (`evaluate --scores`) follow the same order and
the same chosen/rejected convention, so the metrics never look at the raw records again.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from mrm_jax.data import readers, records
from mrm_jax.errors import UserError

BENCHMARKS = ("vl_rewardbench", "multimodal_rewardbench", "mm_rlhf_rewardbench", "pairs")

VL_REWARDBENCH_CATEGORIES = ("general", "hallucination", "reasoning")
MM_RLHF_CATEGORIES = ("mcq", "long", "short", "safety", "video")

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclasses.dataclass
class BenchItem:
  """One benchmark preference pair.

  `pair` is a canonical pair (DESIGN §3.2) ready for `records.pair_to_scoring`; a video
  item has `video` (a folder of frames relative to the image root) and no images.
  `where` is the record's `file:line`, for error messages.
  """

  id: str
  category: str
  pair: dict
  where: str
  video: str | None = None


def check_name(name: str) -> str:
  if name not in BENCHMARKS:
    raise UserError(f"unknown benchmark '{name}' (choose from {', '.join(BENCHMARKS)})")
  return name


def vl_rewardbench_category(item_id: str) -> str:
  """hallucination_pair (POVID), RLAIF-V, RLHF-V → hallucination; mathverse, mmmu → reasoning;
  wildvision and everything else → general (the fixed mapping, not the early scorer's)."""
  low = item_id.lower()
  if low.startswith(("hallucination_pair", "rlaif", "rlhf")):
    return "hallucination"
  if low.startswith(("mathverse", "mmmu")):
    return "reasoning"
  return "general"


def multimodal_rewardbench_category(category: str, item_id: str) -> str:
  """The release's Category with safety split into bias (`pairs*` ids) / toxicity and reasoning
  into math (`math*` ids) / coding, as the official scorer does."""
  low_id = item_id.lower()
  if category == "safety":
    return "safety/bias" if low_id.startswith("pairs") else "safety/toxicity"
  if category == "reasoning":
    return "reasoning/math" if low_id.startswith("math") else "reasoning/coding"
  return category


def _mmrb_category(pair: dict, where: str) -> str:
  meta = pair.get("meta") or {}
  category = meta.get("category")
  if category is None and isinstance(meta.get("meta"), dict):
    category = meta["meta"].get("Category")
  if not isinstance(category, str) or not category:
    raise UserError(f"{where}: missing field 'Category'")
  return multimodal_rewardbench_category(category, pair["id"])


def _mm_rlhf_item(where: str, pair: dict) -> BenchItem:
  videos = pair.get("videos") or []
  if len(videos) > 1 or (videos and pair["images"]) or (not videos and len(pair["images"]) != 1):
    raise UserError(f"{where}: needs one 'image' or one 'video' path")
  path = videos[0] if videos else pair["images"][0]
  category = Path(path).parts[0] if path else ""  # first folder: mcq, long, short, safety, video
  if not category:
    raise UserError(f"{where}: empty image/video path")
  return BenchItem(
    pair["id"],
    category,
    {**pair, "system": records.REWARD_SYSTEM_PROMPT},
    where,
    video=videos[0] if videos else None,
  )


def load(name: str, path: str | os.PathLike, images=None) -> list[BenchItem]:
  """Reads a benchmark release (JSON list, JSON Lines or parquet, via the dataset readers) into
  items, in file order. `images` (a `readers.ImageStore`) receives embedded image bytes (the
  Hugging Face parquet releases). The three benchmarks are scored with the reward-model system
  prompt; `pairs` files keep their own."""

  check_name(name)
  if name == "pairs":
    return [
      BenchItem(pair.get("id", ""), "all", pair, where)
      for where, pair in readers.read(path, "canonical")
    ]
  items = []
  for where, pair in readers.read(path, name, images):
    if name == "mm_rlhf_rewardbench":
      items.append(_mm_rlhf_item(where, pair))
      continue
    category = (
      vl_rewardbench_category(pair["id"])
      if name == "vl_rewardbench"
      else _mmrb_category(pair, where)
    )
    items.append(
      BenchItem(pair["id"], category, {**pair, "system": records.REWARD_SYSTEM_PROMPT}, where)
    )
  return items


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_frames(folder: Path) -> list[Path]:
  """A video's frames: the image files of its folder, in natural order (frame_2 before frame_10)."""
  return sorted(
    (p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS and p.is_file()),
    key=lambda p: _natural_key(p.name),
  )


def missing_media(item: BenchItem, image_root: str | os.PathLike) -> list[str]:
  """The item's image files (or frame folder) that are not there, as paths relative to the root.
  A path escaping the image root is a UserError (never silently skipped)."""
  if item.video is not None:
    folder = records.resolve_image(item.video, image_root, item.where)
    ok = folder.is_dir() and bool(list_frames(folder))
    return [] if ok else [item.video]
  return [
    p for p in item.pair["images"] if not records.resolve_image(p, image_root, item.where).is_file()
  ]


def scoring_records(item: BenchItem, image_root: str | os.PathLike) -> tuple[dict, dict]:
  """(chosen, rejected) scoring records for an item. A video item's frame folder becomes one video
  (`videos: [[frame, ...]]`, paths relative to the image root) as the processor takes it."""
  chosen, rejected = records.pair_to_scoring(item.pair)
  if item.video is not None:
    root = Path(image_root).resolve()
    folder = records.resolve_image(item.video, root, item.where)
    frames = [str(p.relative_to(root)) for p in list_frames(folder)]
    for rec in (chosen, rejected):
      rec["images"] = []
      rec["videos"] = [list(frames)]
  return chosen, rejected
