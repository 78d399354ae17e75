"""The `curate` section of a config (`c.curate = curate_config()`) and its checks."""

from __future__ import annotations

import ml_collections

from mrm_jax.errors import UserError

# "simulated" is the embedded world's judge: mrm_jax.demo supplies it (the library never does).
JUDGE_KINDS = ("simulated", "openai", "stored")


def curate_config() -> ml_collections.ConfigDict:
  """The `curate` section of a config (config files: `c.curate = curate_config()`)."""
  c = ml_collections.ConfigDict()
  c.rounds = 2
  c.noisy = ""  # noisy pair file to curate
  c.base_train = ""  # comma-separated pair files always trained on (debiased + T2I)
  c.image_root = ""  # root of every image path; default data.image_root, else the
  # noisy file's folder
  c.world_dir = ""  # an embedded world (mrm_jax.demo): noisy pairs, base data, truth
  # and model from it
  c.truth = ""  # optional ground truth: noisy_truth.json or world_truth.jsonl
  # (report only)
  c.min_gap = 2.0  # `construct --min-gap` for the world's debiased pairs: right vs
  # wrong answers differ by ~5.5 judge points, two wrong ones by noise
  c.t2i_seed = 42  # `t2i --seed` for the world's T2I pairs
  c.flip_fraction = 0.5
  c.min_votes = 2
  c.initial_models = ""  # comma-separated M_0 scorers (HF dirs or training workdirs);
  # empty = train on base
  c.extra_scorers = ""  # comma-separated fixed scorers added to every round's score stage
  c.compilation_cache = True  # `curate run` keeps JAX's compilation cache in WORKDIR/jax_cache
  c.plots = True
  c.score = ml_collections.ConfigDict()
  c.score.batch_size = 8  # records per forward pass = per line of the resumable score log
  c.score.dtype = "float32"
  c.score.max_len = 0  # 0 = data.max_seq_len
  c.judge = ml_collections.ConfigDict()
  c.judge.kind = "simulated"  # simulated (the world's judge) | openai | stored
  c.judge.base_url = ""  # openai: e.g. http://localhost:8000/v1
  c.judge.judge_model = ""
  c.judge.api_key_env = ""  # name of the variable holding the key (never the key itself)
  c.judge.repeats = 2  # presentations per queued pair: [0,1] and [1,0]
  c.judge.concurrency = 8
  c.judge.max_retries = 5
  c.judge.timeout = 120.0
  c.judge.temperature = 0.0
  c.judge.seed = 0
  c.judge.files = ""  # stored: comma-separated pairwise judgment files; "{round}" = the
  # round index
  c.judge.truth = ""  # simulated: world_truth.jsonl (default: the world's)
  return c


def check_curate_config(cfg) -> None:
  """UserErrors for a missing `curate` section or settings out of range."""
  if "curate" not in cfg:
    raise UserError(
      "the config has no 'curate' section (add `c.curate = curate_config()` from "
      "mrm_jax.curate.config)"
    )
  cc = cfg.curate
  if int(cc.rounds) < 1:
    raise UserError(f"curate.rounds must be at least 1, got {cc.rounds}")
  if not 0 <= float(cc.flip_fraction) <= 1:
    raise UserError(f"curate.flip_fraction must be within [0, 1], got {cc.flip_fraction}")
  if int(cc.min_votes) < 1:
    raise UserError(f"curate.min_votes must be at least 1, got {cc.min_votes}")
  if cc.judge.kind not in JUDGE_KINDS:
    raise UserError(
      f"curate.judge.kind must be one of {', '.join(JUDGE_KINDS)}, got '{cc.judge.kind}'"
    )
  if int(cc.judge.repeats) < 1:
    raise UserError(f"curate.judge.repeats must be at least 1, got {cc.judge.repeats}")
  if int(cc.score.batch_size) < 1:
    raise UserError(f"curate.score.batch_size must be at least 1, got {cc.score.batch_size}")


def split_files(spec: str) -> list[str]:
  """The entries of a comma-separated file list."""
  return [s.strip() for s in str(spec or "").split(",") if s.strip()]
