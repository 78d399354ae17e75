"""ml_collections configs: the base every config file layers on, file loading, and
`--config.KEY=VALUE` overrides (MaxText-style layering: base → model → overrides)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from mrm_jax.errors import UserError
from mrm_jax.topologies import apply_topology

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every run. Config files start from this and change what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.family = "qwen2_vl"  # qwen2_vl | qwen2_5_vl | qwen3_vl
  c.model.path = ""  # local HF directory; empty = random init from `preset`
  c.model.preset = "tiny"  # see mrm_jax.models presets
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay fp32)
  c.model.freeze_vision = True  # vision tower and merger frozen (as in the paper)
  c.model.remat = "none"  # none | full | dots (activation checkpointing policy)
  c.model.attention = "auto"  # auto | xla | cudnn

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # pair file(s) (comma-separated) or tfds:NAME
  c.data.eval = ""
  c.data.image_root = ""  # default: each file's folder
  c.data.max_seq_len = 1024
  c.data.seq_buckets = ()  # static sequence lengths; empty = (max_seq_len,)
  c.data.length_group = 0  # batches per length-sorted group (data/ordering.py); 0 = off
  # one row per pair, [prompt, chosen, rejected], the prompt once (models/pair_layout.py)
  c.data.share_prompt = True
  c.data.image_preprocess = "auto"  # auto | transformers | llamafactory (models/processor.py)
  c.data.template = "model"  # model (the tokenizer's) | qwen2_vl | qwen3_vl | qwen3_vl_nothink
  c.data.max_pixels = 448 * 448
  c.data.min_pixels = 56 * 56
  c.data.patch_budget = 0  # vision patches per batch; 0 = derived from max_pixels
  c.data.max_skip_rate = 0.01  # stop when more than this fraction of records is undecodable
  c.data.num_workers = 4  # parallel encode calls in tf.data
  c.data.shuffle = True

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 100
  c.train.num_epochs = 0  # if > 0, overrides num_steps with epochs over data.train
  c.train.batch_size = 8  # pairs, global
  c.train.grad_accum = 1
  c.train.learning_rate = 1e-5
  c.train.warmup_ratio = 0.1
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.eval_every = 0  # 0 = only at the end
  c.train.keep_checkpoints = 2
  c.train.tensorboard = True  # TensorBoard event files in WORKDIR/tensorboard
  c.train.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = from the device kind

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = fill with the remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.loss = ml_collections.ConfigDict()
  c.loss.margin_scale = 0.0  # margin = margin_scale * strength (0 = plain Bradley-Terry)
  c.loss.center_weight = 0.0  # reward-centering coefficient
  return c


def paper_config(family: str, preset: str, *, grad_accum: int, topology: str | None = None):
  """The paper's recipe (arXiv 2604.19544) for one backbone: lr 1e-5, warmup ratio 0.1, one epoch,
  512 pairs per optimizer step, vision tower and merger frozen, bf16 compute over fp32 master
  weights, full remat, FSDP over all devices. `topology` (a name in mrm_jax.topologies) replaces
  the mesh and batch layout for a given machine."""
  c = base_config()
  c.seed = 42
  c.model.family = family
  c.model.preset = preset  # the architecture for random init when model.path is empty
  c.model.dtype = "bfloat16"
  c.model.freeze_vision = True
  c.model.remat = "full"
  c.data.max_seq_len = 2048
  # Pairs of similar length batched together, into buckets 128 tokens apart: a batch pads to its
  # own longest pair, not to the next power of two (DESIGN's 512/1024/2048 wasted half the tokens
  # on DT2IT-like data; benchmarks/RESULTS.md). 15 static shapes to compile.
  c.data.seq_buckets = tuple(range(256, 2049, 128))
  c.data.length_group = 32
  c.train.num_epochs = 1
  c.train.batch_size = 512  # pairs per optimizer step, all devices together
  c.train.grad_accum = grad_accum  # micro-batches of batch_size / grad_accum pairs
  c.train.learning_rate = 1e-5
  c.train.warmup_ratio = 0.1
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.checkpoint_every = 200
  c.train.eval_every = 200
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  if topology:
    apply_topology(c, topology)
  return c


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
  """`path/to/cfg.py[:arg]` or a bare name in the repository's configs/ folder."""
  name, _, arg = spec.partition(":")
  candidates = [Path(name)]
  if not name.endswith(".py"):
    candidates += [Path("configs") / f"{name}.py", REPO_CONFIGS / f"{name}.py"]
  for c in candidates:
    if c.is_file():
      return c, (arg or None)
  raise UserError(f"config '{spec}' not found (tried {', '.join(str(c) for c in candidates)})")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  path, arg = resolve_config_path(spec)
  module_spec = importlib.util.spec_from_file_location(f"mrm_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a broken config file is the user's to fix: say where
    raise UserError(f"{path}: failed to load config ({type(e).__name__}: {e})") from None
  if not hasattr(module, "get_config"):
    raise UserError(f"{path}: a config file must define get_config()")
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  return cfg


# What an override of a key holding a value of this type must look like (ml_collections' rules).
_EXPECTED = {
  bool: "true or false (or 1/0)",
  int: "an integer",
  float: "a number",
  tuple: "a tuple such as (1, 2) or 1,2",
}


def _override_items(overrides: list[str]) -> list[tuple[str, str]]:
  """`--config.KEY=VALUE` and `--config.KEY VALUE` tokens → (KEY, VALUE) pairs."""
  items: list[tuple[str, str]] = []
  it = iter(overrides)
  for token in it:
    if not token.startswith("--config."):
      raise UserError(
        f"unrecognized argument '{token}' (config overrides look like --config.KEY=VALUE)"
      )
    body = token[len("--config.") :]
    if "=" in body:
      key, value = body.split("=", 1)
    else:
      key, value = body, next(it, None)
      if value is None:
        raise UserError(f"--config.{key}: missing value")
    items.append((key, value))
  return items


def _current_value(cfg: ml_collections.ConfigDict, key: str):
  """The value at dotted `key`; a UserError listing the known keys where the path goes astray
  (ml_collections' own error names only the last part)."""
  parts = key.split(".")
  node = cfg
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
      where = ".".join(parts[:i]) or "top level"
      hint = f" (known at {where}: {known})" if known else ""
      raise UserError(f"unknown config key '{key}'{hint}")
    node = node[part]
  return node


def apply_overrides(
  cfg: ml_collections.ConfigDict, overrides: list[str]
) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` (or `--config.a.b value`) overrides in order, each parsed by
  ml_collections' config flags as `--config.a.b=value` would be (so an integer key refuses 2.5, a
  boolean takes true/false/1/0, a tuple `(1, 2)` or `1,2`); unknown keys are errors."""
  for key, value in _override_items(overrides):
    current = _current_value(cfg, key)
    argv = ["mrm-jax", f"--config.{key}={value}"]
    flag_values = flags.FlagValues()  # private: nothing reaches absl's global FLAGS
    config_flags.DEFINE_config_dict(
      "config", cfg, flag_values=flag_values, lock_config=False, sys_argv=argv
    )
    try:
      flag_values(argv)
    except flags.Error as e:
      expected = _EXPECTED.get(type(current))
      problem = f"expected {expected}, got '{value}'" if expected else str(e).split(": ", 1)[-1]
      raise UserError(f"--config.{key}: {problem}") from None
  return cfg


def load_config(spec: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
  cfg = load_config_file(spec)
  apply_overrides(cfg, list(overrides or []))
  validate_config(cfg, spec)
  return cfg


# Numeric keys checked up front (when the config has them), so `train.batch_size=0` or
# `data.max_pixels=-1` is one line naming the key instead of a failure deep inside a run.
# "int" keys take integers, "float" keys finite numbers; the rule bounds the value.
RULES = {
  ">= 0": lambda v: v >= 0,
  ">= 1": lambda v: v >= 1,
  "> 0": lambda v: v > 0,
  "within [0, 1]": lambda v: 0 <= v <= 1,
  "any": lambda v: True,
}
NUMERIC_KEYS: dict[str, tuple[str, str]] = {
  "seed": ("int", "any"),
  "data.max_seq_len": ("int", ">= 1"),
  "data.max_pixels": ("int", ">= 1"),
  "data.min_pixels": ("int", ">= 1"),
  "data.patch_budget": ("int", ">= 0"),
  "data.length_group": ("int", ">= 0"),
  "data.max_skip_rate": ("float", "within [0, 1]"),
  "data.num_workers": ("int", ">= 1"),
  "train.num_steps": ("int", ">= 0"),
  "train.num_epochs": ("float", ">= 0"),
  "train.batch_size": ("int", ">= 1"),
  "train.grad_accum": ("int", ">= 1"),
  "train.learning_rate": ("float", ">= 0"),
  "train.warmup_ratio": ("float", "within [0, 1]"),
  "train.weight_decay": ("float", ">= 0"),
  "train.grad_clip": ("float", ">= 0"),
  "train.log_every": ("int", ">= 1"),
  "train.checkpoint_every": ("int", ">= 1"),
  "train.eval_every": ("int", ">= 0"),
  "train.keep_checkpoints": ("int", ">= 1"),
  "train.peak_flops": ("float", ">= 0"),
  "loss.margin_scale": ("float", "any"),
  "loss.center_weight": ("float", ">= 0"),
  "curate.score.batch_size": ("int", ">= 1"),
  "curate.judge.concurrency": ("int", ">= 1"),
  "curate.judge.max_retries": ("int", ">= 0"),
  "curate.judge.timeout": ("float", "> 0"),
  "curate.judge.temperature": ("float", ">= 0"),
}
MESH_KEYS = ("mesh.data", "mesh.fsdp", "mesh.tensor")  # -1 (fill) or a positive size


def _lookup(cfg, key: str):
  node = cfg
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def _numeric_error(value, kind: str, rule: str) -> str | None:
  if isinstance(value, bool) or not isinstance(value, (int, float) if kind == "float" else int):
    return f"must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}"
  if kind == "float" and not math.isfinite(value):
    return f"must be a finite number, got {value!r}"
  if not RULES[rule](value):
    return f"must be {rule}, got {value!r}"
  return None


# Keys that name one of a few settings.
CHOICE_KEYS: dict[str, tuple[str, ...]] = {
  "model.remat": ("none", "full", "dots"),
  "data.image_preprocess": ("auto", "transformers", "llamafactory"),
  "data.template": ("model", "qwen2_vl", "qwen3_vl", "qwen3_vl_nothink"),
}


def validate_config(cfg, source: str = "config") -> None:
  """Checks the keys of NUMERIC_KEYS and CHOICE_KEYS and the mesh sizes; a UserError naming the
  first bad key."""
  for key, choices in CHOICE_KEYS.items():
    value = _lookup(cfg, key)
    if value is not None and value not in choices:
      raise UserError(f"{source}: {key} must be one of {', '.join(choices)}, got {value!r}")
  for key, (kind, rule) in NUMERIC_KEYS.items():
    value = _lookup(cfg, key)
    if value is not None and (problem := _numeric_error(value, kind, rule)):
      raise UserError(f"{source}: {key} {problem}")
  for key in MESH_KEYS:
    value = _lookup(cfg, key)
    if value is not None and value != -1 and _numeric_error(value, "int", ">= 1"):
      raise UserError(
        f"{source}: {key} must be -1 (fill with the remaining devices) or at least 1, got {value!r}"
      )
  lo, hi = _lookup(cfg, "data.min_pixels"), _lookup(cfg, "data.max_pixels")
  if lo is not None and hi is not None and lo > hi:
    raise UserError(f"{source}: data.min_pixels ({lo}) is larger than data.max_pixels ({hi})")


def config_to_dict(cfg) -> dict:
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
