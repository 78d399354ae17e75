"""The embedded synthetic world (DESIGN §11): a tiny Qwen2-VL-shaped reward model on CPU.

The model comes from the world's model directory (WORKDIR/world/model: config + tokenizer, no
weights, so it is random-initialised with the config's `initializer_range`, see
mrm_jax/demo/model_dir.py). Every sequence of the world is at most 128 tokens (two-image T2I
pairs are the longest), so three short buckets replace the generic 1024-token shape. The learning
rate is the largest that stays stable: at 3e-3 the tiny model's rewards collapse to a constant
(gradient norm ~0.01) within a hundred steps; at 2e-3 it reads colours from the pixels, reaching
held-out 0.93 after 200 steps and 0.99 after 300 on the world's debiased + T2I pairs (world.py,
"Learnability").

Every training run lasts a fixed number of epochs over its data, as reward-model recipes count
training (LLaMA-Factory's `num_train_epochs`): the base run (~1200 debiased + T2I pairs) takes 225
steps, a curation round's retrain on those plus ~1000 noisy pairs about 410. With a fixed 300 steps
for every run the retrains saw each pair half as often as the base run and ended less converged:
the colour pair learnt last (cyan against green or blue) was still ~1-3% wrong after 300 steps in
some runs, about the same whether the noisy labels had been curated or not.
"""

from mrm_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.seed = 0
  c.model.family = "qwen2_vl"
  c.model.preset = "tiny"
  c.model.freeze_vision = False   # the tiny vision tower is random: it has to learn too
  c.data.max_seq_len = 128
  c.data.seq_buckets = (64, 96, 128)
  c.data.max_pixels = 64 * 64
  c.data.min_pixels = 28 * 28
  c.train.num_epochs = 3           # overrides num_steps (set num_epochs=0 to count steps)
  c.train.batch_size = 16
  c.train.learning_rate = 2e-3
  c.train.warmup_ratio = 0.1
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  return c
