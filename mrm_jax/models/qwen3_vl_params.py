"""Qwen3-VL's HF parameter names: its own vision tower (patch embedding with bias, learned position
table, `linear_fc*` names, DeepStack mergers) and the shared decoder with q/k norms."""

from __future__ import annotations

from mrm_jax.models.layers import (
  ParamNames,
  linear_names,
  norm_names,
  text_model_names,
  vision_block_names,
)


def mlp_names(prefix: str, path: tuple) -> ParamNames:
  return linear_names(f"{prefix}.linear_fc1", path + ("fc1",)) + linear_names(
    f"{prefix}.linear_fc2", path + ("fc2",)
  )


def merger_names(prefix: str, path: tuple) -> ParamNames:
  return (
    norm_names(f"{prefix}.norm", path + ("norm",), True)
    + linear_names(f"{prefix}.linear_fc1", path + ("linear_fc1",))
    + linear_names(f"{prefix}.linear_fc2", path + ("linear_fc2",))
  )


def hf_param_map(cfg) -> ParamNames:
  v, vp = "model.visual", ("visual",)
  out = [
    (f"{v}.patch_embed.proj.weight", vp + ("patch_embed", "kernel"), "patch_embed"),
    (f"{v}.patch_embed.proj.bias", vp + ("patch_embed", "bias"), "copy"),
    (f"{v}.pos_embed.weight", vp + ("pos_embed", "embedding"), "copy"),
  ]
  out += vision_block_names(cfg.vision, mlp_names, v)
  out += merger_names(f"{v}.merger", vp + ("merger",))
  for j in range(len(cfg.vision.deepstack_visual_indexes)):
    out += merger_names(f"{v}.deepstack_merger_list.{j}", vp + ("deepstack_merger_list", j))
  return out + text_model_names(cfg.text)
