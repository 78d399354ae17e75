"""The model families: config.json `model_type` (= `model.family`) -> its module, imported on
first use so a command loads only the family it runs."""

from __future__ import annotations

import importlib
from types import ModuleType

from mrm_jax.errors import UserError

# model_type (= config.json "model_type" = cfg.model.family) -> module
FAMILIES: dict[str, str] = {
  "qwen2_vl": "mrm_jax.models.qwen2_vl",
  "qwen2_5_vl": "mrm_jax.models.qwen2_5_vl",
  "qwen3_vl": "mrm_jax.models.qwen3_vl",
}


def get_family(name: str) -> ModuleType:
  """The family module for a model_type / family name (lazily imported)."""
  key = str(name).lower().replace("-", "_")
  if key not in FAMILIES:
    raise UserError(
      f"unknown model family / model_type '{name}' (supported: {', '.join(FAMILIES)})"
    )
  return importlib.import_module(FAMILIES[key])
