"""Qwen2-VL's HF parameter names: `(hf_key, nnx_path, kind)` for every parameter of its Backbone."""

from __future__ import annotations

from mrm_jax.models.layers import ParamNames, linear_names, text_model_names, vision_tower_names


def mlp_names(prefix: str, path: tuple) -> ParamNames:
  """The vision blocks' fc1 → QuickGELU → fc2 MLP."""
  return linear_names(f"{prefix}.fc1", path + ("fc1",)) + linear_names(
    f"{prefix}.fc2", path + ("fc2",)
  )


def hf_param_map(cfg) -> ParamNames:
  return vision_tower_names(cfg.vision, mlp_names) + text_model_names(cfg.text)
