"""One way to load a reward model, whatever the path names: a local HF directory (weights, optional
`value_head.safetensors`, tokenizer and processor files) or a training workdir (its latest orbax
checkpoint, rebuilt from the config in its manifest, with the processor of the HF directory the
run started from). `score`, `evaluate`, `best-of-n`, `export`, curation and the demo all load here.
"""

from __future__ import annotations

import os
from pathlib import Path

from mrm_jax.errors import UserError
from mrm_jax.models import hf_io
from mrm_jax.models.processor import Processor
from mrm_jax.train.loop import load_model_from_workdir

PathLike = str | os.PathLike


def is_training_workdir(path: PathLike) -> bool:
  """A folder `mrm-jax train` wrote (its manifest names the run's config; checkpoints may be
  missing or broken, which loading then reports)."""
  return (Path(path) / "manifest.json").is_file()


def load_model(
  path: PathLike,
  *,
  dtype: str = "float32",
  devices=None,
  min_pixels: int | None = None,
  max_pixels: int | None = None,
  processor_dir: PathLike | None = None,
  image_preprocess: str | None = None,
  template: str | None = None,
):
  """`(RewardModel, Processor)` from an HF directory or a training workdir.

  Pixel limits left `None` come from the model directory's processor files (HF) or from the run's
  `data.min_pixels` / `data.max_pixels` (workdir), so a model sees images as it was trained.
  `processor_dir` is where a workdir's tokenizer comes from when its run did not start from an HF
  directory. `devices` (workdir only) restricts the mesh the parameters are restored onto.
  `image_preprocess` / `template` left `None` are the run's `data.image_preprocess` /
  `data.template` (workdir), or the HF directory's defaults (`Processor.from_pretrained`)."""
  path = Path(path)
  if not path.exists():
    raise UserError(f"{path}: no such model (an HF directory or a training workdir)")
  if is_training_workdir(path):
    model, run_cfg = load_model_from_workdir(path, dtype=dtype, devices=devices)
    source = run_cfg.model.path or processor_dir
    if not source:
      raise UserError(
        f"{path}: the run started from a preset, not an HF directory, so its tokenizer is "
        f"unknown; export it (mrm-jax export) next to a tokenizer, or pass one"
      )
    min_pixels = int(run_cfg.data.min_pixels) if min_pixels is None else min_pixels
    max_pixels = int(run_cfg.data.max_pixels) if max_pixels is None else max_pixels
    image_preprocess = image_preprocess or run_cfg.data.get("image_preprocess", None)
    template = template or run_cfg.data.get("template", None)
  else:
    model, source = hf_io.load_hf(path, dtype=dtype), path
  processor = Processor.from_pretrained(
    source,
    model.family,
    model.config,
    min_pixels=min_pixels,
    max_pixels=max_pixels,
    image_preprocess=image_preprocess,
    template=template,
  )
  return model, processor


def load_for_export(path: PathLike):
  """`(model, source_dir)`: the model, and the HF directory whose tokenizer and processor files an
  export copies (None for a workdir trained from a preset)."""
  path = Path(path)
  if not path.exists():
    raise UserError(f"{path}: no such checkpoint")
  if is_training_workdir(path):
    model, run_cfg = load_model_from_workdir(path)
    return model, (Path(run_cfg.model.path) if run_cfg.model.path else None)
  return hf_io.load_hf(path), path
