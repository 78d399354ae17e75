"""Our LLaMA-Factory image-preprocessing mode vs the real LLaMA-Factory: its Qwen2-VL / Qwen3-VL
mm plugins' image regularisation followed by transformers' default (torchvision) image processor.
Run with the LLaMA-Factory virtualenv's python (run_interop.sh makes one); prints the max
|difference| of the pixel values and whether the patch grids agree, per image and family."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llamafactory.data.mm_plugin import get_mm_plugin  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import (  # noqa: E402
  Qwen2VLImageProcessor,
)

from mrm_jax.models.processor import llamafactory_image, process_image  # noqa: E402

FAMILIES = {
  "qwen2_vl": (
    dict(
      patch_size=14,
      temporal_patch_size=2,
      merge_size=2,
      min_pixels=56 * 56,
      max_pixels=28 * 28 * 1280,
      image_mean=[0.48145466, 0.4578275, 0.40821073],
      image_std=[0.26862954, 0.26130258, 0.27577711],
    ),
    "qwen2_vl",
  ),
  "qwen3_vl": (
    dict(
      patch_size=16,
      temporal_patch_size=2,
      merge_size=2,
      min_pixels=65536,
      max_pixels=16777216,
      image_mean=[0.5] * 3,
      image_std=[0.5] * 3,
    ),
    "qwen3_vl",
  ),
}


def images(rng):
  yield "1024x768", Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
  yield "200x20", Image.fromarray(rng.integers(0, 256, (20, 200, 3), dtype=np.uint8))
  yield "20x20", Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
  yield "RGBA 300x200", Image.fromarray(rng.integers(0, 256, (200, 300, 4), dtype=np.uint8), "RGBA")
  yield "L 640x480", Image.fromarray(rng.integers(0, 256, (480, 640), dtype=np.uint8), "L")
  yield "3000x2000", Image.fromarray(rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8))


def main():
  rng = np.random.default_rng(0)
  worst = 0.0
  for family, (settings, plugin_name) in FAMILIES.items():
    plugin = get_mm_plugin(plugin_name, image_token="<|image_pad|>", video_token="<|video_pad|>")
    size = {"shortest_edge": settings["min_pixels"], "longest_edge": settings["max_pixels"]}
    hf = Qwen2VLImageProcessor(
      patch_size=settings["patch_size"],
      merge_size=2,
      temporal_patch_size=2,
      size=size,
      image_mean=settings["image_mean"],
      image_std=settings["image_std"],
    )
    for name, im in images(rng):
      lf_img = plugin._regularize_images(
        [im], image_max_pixels=768 * 768, image_min_pixels=32 * 32
      )["images"][0]
      ref = hf(images=[lf_img], return_tensors="np")
      ours, thw = process_image(llamafactory_image(im), settings, backend="torchvision")
      lf_grid = tuple(int(x) for x in ref["image_grid_thw"][0])
      same_grid = lf_grid == tuple(int(x) for x in thw)
      diff = float(np.abs(ours - ref["pixel_values"]).max()) if same_grid else float("inf")
      worst = max(worst, diff)
      print(
        f"{family:9s} {name:13s} grid {tuple(int(x) for x in thw)} LF {lf_grid} "
        f"max|diff| {diff:.3g}"
      )
  print(f"worst max|diff| {worst:.3g}")
  return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
  sys.exit(main())
