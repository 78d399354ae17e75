"""Qwen2.5-VL's HF parameter names: Qwen2-VL's but for the vision blocks' biased SwiGLU MLP (and,
through the config's `norm`, their bias-free RMSNorms)."""

from __future__ import annotations

from mrm_jax.models.layers import ParamNames, linear_names, text_model_names, vision_tower_names


def mlp_names(prefix: str, path: tuple) -> ParamNames:
  return [
    e
    for name in ("gate_proj", "up_proj", "down_proj")
    for e in linear_names(f"{prefix}.{name}", path + (name,))
  ]


def hf_param_map(cfg) -> ParamNames:
  return vision_tower_names(cfg.vision, mlp_names) + text_model_names(cfg.text)
