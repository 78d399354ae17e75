"""The embedded synthetic world (DESIGN §11): a tiny Qwen2-VL-shaped reward model on CPU.

The model comes from the world's model directory (WORKDIR/world/model: config + tokenizer, no
weights, so it is random-initialised with the config's `initializer_range`, see
mrm_jax/demo/model_dir.py). Every sequence of the world is at most 128 tokens (two-image T2I
pairs are the longest), so three short buckets replace the generic 1024-token shape. The learning
rate is 1e-3. At 3e-3 the tiny model's rewards collapse to a constant (gradient norm ~0.01) within
a hundred steps; 2e-3, the previous setting, sits near that edge: its runs mostly reached held-out
0.99-1.00, but some stalled with tiny gradients and one or two colour pairs unlearnt (world seed 2:
0.840 after round 0 and 0.780 after the last round of the demo). At 1e-3 the same data reached
1.000 (round-2 data of that world, 411 steps) and 0.995-1.000 on base data of other worlds.
"""

from mrm_jax.config import base_config
from mrm_jax.demo.world import world_config


def get_config(arg=None):
  c = base_config()
  c.seed = 0
  c.model.family = "qwen2_vl"
  c.model.preset = "tiny"
  c.model.freeze_vision = False  # the tiny vision tower is random: it has to learn too
  c.data.max_seq_len = 128
  c.data.seq_buckets = (64, 96, 128)
  c.data.max_pixels = 64 * 64
  c.data.min_pixels = 28 * 28
  c.train.num_steps = 300  # the demo itself counts epochs instead: configs/curate_demo.py
  c.train.batch_size = 16
  c.train.learning_rate = 1e-3
  c.train.warmup_ratio = 0.1
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  # With data.train empty, `mrm-jax train` trains on this embedded world (WORKDIR/world, its
  # debiased and T2I pairs; held-out pairs for eval): --config.world.size=small for a quick run.
  c.world = world_config("full")
  return c
