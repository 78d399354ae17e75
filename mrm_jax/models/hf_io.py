"""HF-format checkpoints in and out: config.json + (sharded) safetensors + `value_head.safetensors`.

Loading accepts both parameter naming schemes seen on the hub: transformers-5
(`model.language_model.*`, `model.visual.*`) and the older one (`model.layers.*`,
`model.embed_tokens.*`, `model.norm.*`, `visual.*`). Tensors are read one at a time (shape checked
from the header before the data is read) and cast to the parameter dtype, so peak host memory stays
near the size of the model in that dtype. The value head comes from LLaMA-Factory's
`value_head.safetensors` (`v_head.summary.weight [1, H]`, `v_head.summary.bias [1]`), or is freshly
initialised (with a warning) when absent. Export writes the current names, loadable by transformers.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save as st_save

from mrm_jax.errors import UserError
from mrm_jax.io import atomic_open, atomic_outputs, read_json_object, write_json
from mrm_jax.models.common import abstract_params
from mrm_jax.models.families import FAMILIES, get_family
from mrm_jax.models.reward import RewardModel

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
V_HEAD_WEIGHT = "v_head.summary.weight"
V_HEAD_BIAS = "v_head.summary.bias"
LM_HEAD = "lm_head.weight"
# files that make an HF directory usable for scoring besides the weights
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "vocab.json",
  "merges.txt",
  "special_tokens_map.json",
  "added_tokens.json",
  "chat_template.jinja",
  "chat_template.json",
  "preprocessor_config.json",
  "video_preprocessor_config.json",
  "processor_config.json",
  "generation_config.json",
)

# transformers-5 prefix -> older hub prefix
_LEGACY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def legacy_name(key: str) -> str:
  for new, old in _LEGACY_PREFIXES:
    if key.startswith(new):
      return old + key[len(new) :]
  return key


def read_config(path: str | os.PathLike) -> dict:
  path = Path(path)
  if not path.is_dir():
    raise UserError(f"{path}: not a directory (expected an HF model directory)")
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise UserError(f"{path}: no config.json (not an HF model directory)")
  return read_json_object(cfg_file)


def family_and_config(path: str | os.PathLike):
  """(family module, Config) from a directory's config.json."""

  d = read_config(path)
  model_type = d.get("model_type")
  if model_type not in FAMILIES:
    raise UserError(
      f"{Path(path) / 'config.json'}: unknown model_type '{model_type}' "
      f"(supported: {', '.join(FAMILIES)})"
    )
  fam = get_family(model_type)
  cfg_file = Path(path) / "config.json"
  try:
    return fam, fam.Config.from_hf(d)
  except UserError as e:  # from_hf names the file by its base name only
    raise UserError(f"{cfg_file}: {str(e).removeprefix('config.json: ')}") from None
  except (
    TypeError,
    ValueError,
    KeyError,
    AttributeError,
    ZeroDivisionError,
  ) as e:  # a field of a wrong type
    raise UserError(
      f"{cfg_file}: invalid {fam.MODEL_TYPE} config ({type(e).__name__}: {e})"
    ) from None


def _safetensors_error(f: Path, e: Exception) -> UserError:
  """A safetensors failure (truncated file, garbage header, bad offsets): one line naming the
  file."""
  return UserError(
    f"{f}: not a readable safetensors file ({str(e).strip() or type(e).__name__}); "
    "the download or copy may be incomplete"
  )


class _TensorIndex:
  """Which safetensors file holds each tensor of a checkpoint directory; reads one tensor at a
  time."""

  def __init__(self, path: Path, files: list[Path]):

    self.path = path
    self.where: dict[str, Path] = {}
    self._open = {}
    for f in files:
      try:
        h = safe_open(str(f), framework="numpy")
        names = list(h.keys())
      except OSError as e:
        raise UserError(f"{f}: cannot read ({e.strerror or e})") from None
      except Exception as e:  # safetensors' SafetensorError (and older versions' plain errors)
        raise _safetensors_error(f, e) from None
      self._open[f] = h
      for k in names:
        self.where[k] = f

  def find(self, key: str) -> str | None:
    for k in (key, legacy_name(key)):
      if k in self.where:
        return k
    return None

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._open[self.where[key]].get_slice(key).get_shape())

  def get(self, key: str) -> np.ndarray:
    try:
      return self._open[self.where[key]].get_tensor(key)
    except (MemoryError, KeyboardInterrupt):
      raise
    except Exception as e:  # data region shorter than the header says, an unknown dtype, ...
      raise _safetensors_error(self.where[key], e) from None

  def file_of(self, key: str) -> Path:
    return self.where[key]


def weight_files(path: Path) -> list[Path]:
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise UserError(
        f"{index}: malformed index ('weight_map' should map tensor names to file names)"
      )
    files = [path / f for f in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
      raise UserError(f"{index}: lists missing shard(s): {', '.join(missing)}")
    return files
  single = path / "model.safetensors"
  if single.is_file():
    return [single]
  shards = sorted(p for p in path.glob("*.safetensors") if p.name != VALUE_HEAD_FILE)
  if shards:
    return shards
  raise UserError(
    f"{path}: no model weights (expected model.safetensors or model.safetensors.index.json + "
    "shards)"
  )


def _hf_to_param(kind: str, arr: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
  if kind == "linear":
    return arr.T
  if kind == "patch_embed":
    return arr.reshape(arr.shape[0], -1).T
  return arr


def _param_to_hf(kind: str, arr: np.ndarray, hf_shape: tuple[int, ...] | None) -> np.ndarray:
  if kind == "linear":
    return arr.T
  if kind == "patch_embed":
    return arr.T.reshape(hf_shape)
  return arr


def _expected_hf_shape(kind: str, param_shape: tuple[int, ...], cfg) -> tuple[int, ...]:
  if kind == "linear":
    return tuple(reversed(param_shape))
  if kind == "patch_embed":
    v = cfg.vision
    return (param_shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  return tuple(param_shape)


def _get(module, path: tuple):
  obj = module
  for p in path:
    obj = obj[p] if isinstance(p, int) else getattr(obj, p)
  return obj


def load_hf(path, *, dtype="float32", param_dtype="float32", attention=None, remat="none"):
  """A `RewardModel` with the weights of a local HF directory (see the module docstring)."""

  path = Path(path)
  fam, cfg = family_and_config(path)
  index = _TensorIndex(path, weight_files(path))
  pdt = jnp.dtype(param_dtype)
  with abstract_params():  # shapes + metadata only; every parameter is filled from the files below
    model = RewardModel(
      fam,
      cfg,
      rngs=nnx.Rngs(0),
      dtype=jnp.dtype(dtype),
      param_dtype=pdt,
      attention=attention,
      remat=remat,
    )
  for hf_key, nnx_path, kind in fam.hf_param_map(cfg):
    param = _get(model.backbone, nnx_path)
    want = tuple(param.get_value().shape)
    key = index.find(hf_key)
    if key is None:
      raise UserError(
        f"{path}: tensor '{hf_key}' (or '{legacy_name(hf_key)}') not found in the checkpoint"
      )
    hf_shape = _expected_hf_shape(kind, want, cfg)
    if index.shape(key) != hf_shape:
      raise UserError(
        f"{index.file_of(key)}: tensor '{key}' has shape {list(index.shape(key))}, expected "
        f"{list(hf_shape)} from config.json"
      )
    param.set_value(jnp.asarray(_hf_to_param(kind, index.get(key), want).astype(pdt)))
  _load_value_head(model, path, index, pdt)
  unset = [
    k
    for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    if isinstance(v.get_value(), jax.ShapeDtypeStruct)
  ]
  if unset:
    raise ValueError(f"{fam.MODEL_TYPE}.hf_param_map misses parameters: {unset[:5]}")
  return model


def _load_value_head(model, path: Path, index: _TensorIndex, pdt) -> None:
  h = model.config.hidden_size
  head_file = path / VALUE_HEAD_FILE
  src = None
  if head_file.is_file():
    src = _TensorIndex(path, [head_file])
  elif index.find(V_HEAD_WEIGHT) is not None:
    src = index
  if src is None:
    log.warning(
      "%s: no %s; the value head is freshly initialised (rewards are meaningless until trained)",
      path,
      VALUE_HEAD_FILE,
    )
    fresh = nnx.Rngs(0).params()
    model.v_head.kernel.set_value(
      (jax.random.normal(fresh, (h, 1), jnp.float32) / (h + 1)).astype(pdt)
    )
    model.v_head.bias.set_value(jnp.zeros((1,), pdt))
    return
  for key, want in ((V_HEAD_WEIGHT, (1, h)), (V_HEAD_BIAS, (1,))):
    if src.find(key) is None:
      raise UserError(f"{src.file_of(next(iter(src.where)))}: tensor '{key}' not found")
    if src.shape(key) != want:
      raise UserError(
        f"{src.file_of(key)}: tensor '{key}' has shape {list(src.shape(key))}, expected "
        f"{list(want)}"
      )
  model.v_head.kernel.set_value(jnp.asarray(src.get(V_HEAD_WEIGHT).T.astype(pdt)))
  model.v_head.bias.set_value(jnp.asarray(src.get(V_HEAD_BIAS).astype(pdt)))


# ----------------------------------------------------------------------------------------------
# Export


def export_hf(
  model,
  out_dir,
  *,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 1024**3,
  source_dir: str | os.PathLike | None = None,
) -> Path:
  """Writes `model` (a RewardModel) as an HF directory: config.json, model safetensors (current key
  names, sharded with an index above `max_shard_bytes`), value_head.safetensors, and the tokenizer /
  preprocessor files copied from `source_dir` when given. The files are committed together
  (`atomic_outputs`: a failure leaves a previous export in `out_dir` as it was), config.json
  last."""

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  fam, cfg = model.family, model.config
  np_dtype = (
    None if dtype is None else (ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
  )

  def host(x):
    a = np.asarray(jax.device_get(x))
    return a.astype(np_dtype) if np_dtype is not None else a

  entries = []
  for hf_key, nnx_path, kind in fam.hf_param_map(cfg):
    param = _get(model.backbone, nnx_path)
    hf_shape = _expected_hf_shape(kind, tuple(param.get_value().shape), cfg)
    entries.append((hf_key, param, kind, hf_shape))
  entries += _lm_head_entry(cfg, source_dir, entries)
  itemsize = np.dtype(np_dtype).itemsize if np_dtype is not None else None
  sizes = [
    math.prod(s) * (itemsize or np.dtype(p.get_value().dtype).itemsize) for _, p, _, s in entries
  ]
  shards, cur, cur_size = [], [], 0
  for e, size in zip(entries, sizes):
    if cur and cur_size + size > max_shard_bytes:
      shards.append(cur)
      cur, cur_size = [], 0
    cur.append(e)
    cur_size += size
  shards.append(cur)
  names = (
    ["model.safetensors"]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  hf_cfg = cfg.to_hf()
  hf_cfg["dtype"] = dtype or str(np.dtype(entries[0][1].get_value().dtype))
  with atomic_outputs():
    weight_map = {}
    for name, shard in zip(names, shards):
      tensors = {
        k: np.ascontiguousarray(_param_to_hf(kind, host(p.get_value()), s))
        for k, p, kind, s in shard
      }
      _write_safetensors(out / name, tensors)
      weight_map.update({k: name for k in tensors})
      del tensors
    if len(shards) > 1:
      write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map},
      )
    head = {
      V_HEAD_WEIGHT: np.ascontiguousarray(host(model.v_head.kernel.get_value()).T),
      V_HEAD_BIAS: host(model.v_head.bias.get_value()),
    }
    _write_safetensors(out / VALUE_HEAD_FILE, head)
    if source_dir is not None and Path(source_dir).resolve() != out.resolve():
      _copy_processor_files(Path(source_dir), out)
    write_json(out / "config.json", hf_cfg)  # last: it is what makes the directory an HF model
  stale = out / "model.safetensors.index.json"
  if (
    len(shards) == 1 and stale.exists()
  ):  # only now: until the commit the old index matched the old shards
    stale.unlink()
  return out


class _HostTensor:
  """A numpy array where export expects a parameter (`get_value()`)."""

  def __init__(self, value: np.ndarray):
    self.value = value

  def get_value(self) -> np.ndarray:
    return self.value


def _lm_head_entry(cfg, source_dir, entries) -> list:
  """`lm_head.weight` for the export: the reward model never computes it, but transformers (and so
  LLaMA-Factory) expects it unless the config ties it to the embeddings. Carried from the base
  model's weights in `source_dir`; without them a warning says transformers will initialise it."""
  if getattr(cfg, "tie_word_embeddings", False):
    return []
  embed = next((e for e in entries if e[0].endswith("embed_tokens.weight")), None)
  want = tuple(embed[3]) if embed is not None else None
  if source_dir is not None:
    source = Path(source_dir)
    try:
      index = _TensorIndex(source, weight_files(source))
    except UserError:
      index = None
    if index is not None and index.find(LM_HEAD) is not None:
      if want is not None and index.shape(LM_HEAD) != want:
        raise UserError(
          f"{index.file_of(LM_HEAD)}: tensor '{LM_HEAD}' has shape "
          f"{list(index.shape(LM_HEAD))}, expected {list(want)} from the model"
        )
      return [(LM_HEAD, _HostTensor(index.get(LM_HEAD)), "copy", index.shape(LM_HEAD))]
  log.warning(
    "export: no %s to carry (the base model directory%s has none and the config does "
    "not tie it to the embeddings); transformers will initialise it when loading the "
    "export",
    LM_HEAD,
    f" {source_dir}" if source_dir is not None else " is unknown",
  )
  return []


def _write_safetensors(path: Path, tensors: dict) -> None:

  with atomic_open(path, "wb") as f:
    f.write(st_save(tensors, metadata={"format": "pt"}))


def _copy_processor_files(source_dir: Path, out: Path) -> None:
  for fname in TOKENIZER_FILES:
    src = source_dir / fname
    if src.is_file():
      with open(src, "rb") as fin, atomic_open(out / fname, "wb") as fout:
        shutil.copyfileobj(fin, fout)
