"""`mrm-jax export`: a reward model → an HF directory (config.json, safetensors with transformers-5
names, `value_head.safetensors`, tokenizer and preprocessor files), loadable by transformers and by
`mrm-jax score`. `--checkpoint` is an HF-format model directory here; the training code extends
`load_checkpoint_for_export` to workdir (orbax) checkpoints.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True, help="model to export: an HF-format directory "
                      "(or a training workdir checkpoint)")
  parser.add_argument("--output", required=True, help="output HF directory")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                      help="tensor dtype in the safetensors (default: the parameter dtype)")


def export_reward_model(model, config, out_dir, *, source_dir=None, dtype: str | None = None) -> Path:
  """Writes `model` (a RewardModel whose Config is `config`) as an HF directory; tokenizer and
  preprocessor files are copied from `source_dir` when given."""
  from mrm_jax.errors import UserError
  from mrm_jax.models import hf_io
  if model.config != config:
    raise UserError("export: the model was built from a different config than the one given")
  return hf_io.export_hf(model, out_dir, dtype=dtype, source_dir=source_dir)


def load_checkpoint_for_export(path: str):
  """(model, config, source_dir) for a checkpoint path."""
  from mrm_jax.errors import UserError
  from mrm_jax.models import hf_io
  p = Path(path)
  if not p.exists():
    raise UserError(f"{p}: no such checkpoint")
  if (p / "manifest.json").is_file() and (p / "checkpoints").is_dir():  # a training workdir (orbax)
    from mrm_jax.train.loop import load_model_from_workdir
    model, cfg = load_model_from_workdir(p)
    return model, model.config, (Path(cfg.model.path) if cfg.model.path else None)
  model = hf_io.load_hf(p)
  return model, model.config, p


def run(args) -> int:
  from mrm_jax.io import check_distinct_paths, check_writable_dir
  out = Path(args.output).resolve()
  check_distinct_paths({"--output": out}, {"--checkpoint": args.checkpoint})
  model, config, source_dir = load_checkpoint_for_export(args.checkpoint)
  check_writable_dir(out)
  export_reward_model(model, config, out, source_dir=source_dir, dtype=args.dtype)
  print(f"exported {args.checkpoint} -> {out}")
  return 0
