"""What a curation run reads: the noisy pairs, the base training data, the model, and the rest.

`inputs_from_config(cfg)` takes them from the `curate` section (curate.noisy, curate.base_train,
...); other sources (the embedded world of mrm_jax.demo) build `CurationInputs` themselves.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mrm_jax.curate import steps
from mrm_jax.curate.config import split_files
from mrm_jax.data.records import iter_pairs
from mrm_jax.errors import UserError, at
from mrm_jax.io import same_file

# Directories of WORKDIR that `curate run` writes or wipes.
RUN_DIRS = re.compile(r"(round_\d+|base|prepare|plots)$")
RUN_FILES = ("curated.jsonl", "report.json")


@dataclasses.dataclass(frozen=True)
class CurationInputs:
  """The files a run curates and trains on. Image paths of every pair file are relative to
  `image_root`. `model` is the HF directory whose config and tokenizer every model trained here
  uses (and whose weights, if any, it starts from); `eval` the `data.eval` split of every
  training run (empty: none); `truth`, optional, is only reported against (`report.load_truth`).
  Constructing one checks that the files exist and that the noisy pairs have distinct ids (the
  votes are matched on them)."""

  noisy: Path
  base_train: tuple[Path, ...]
  image_root: Path
  model: str
  eval: str = ""
  truth: str = ""

  def __post_init__(self):
    for f in [self.noisy, *self.base_train]:
      if not Path(f).is_file():
        raise UserError(f"{f}: no such file")
    pairs = list(iter_pairs(self.noisy))
    steps.check_unique_ids([(at(self.noisy, n), p) for n, p in pairs])


def inputs_from_config(cfg) -> CurationInputs:
  """The inputs the config names: curate.noisy, curate.base_train, curate.image_root (default
  data.image_root, else the noisy file's folder), model.path, data.eval, curate.truth."""
  cc = cfg.curate
  if not cc.noisy:
    raise UserError(
      "curate.noisy is not set (the noisy pair file to curate), and no embedded "
      "world (curate.world_dir) was given"
    )
  noisy = Path(cc.noisy).resolve()
  return CurationInputs(
    noisy=noisy,
    base_train=tuple(Path(f).resolve() for f in split_files(cc.base_train)),
    image_root=Path(cc.image_root or cfg.data.image_root or noisy.parent).resolve(),
    model=cfg.model.path,
    eval=cfg.data.eval,
    truth=cc.truth,
  )


def check_not_run_outputs(cc, workdir: Path) -> None:
  """The user's files named in the config must not be files the run in `workdir` rewrites or
  wipes: its final outputs, or anything in a stage directory (a stage whose inputs changed is
  deleted and redone)."""
  named = [
    ("curate.noisy", cc.noisy),
    ("curate.truth", cc.truth),
    *(("curate.base_train", f) for f in split_files(cc.base_train)),
  ]
  finals = [workdir / name for name in RUN_FILES]
  for key, f in named:
    if not f:
      continue
    f = Path(f).resolve()
    inside = [p for p in f.parents if p.parent == workdir and RUN_DIRS.match(p.name)]
    if any(same_file(f, o) for o in finals) or inside:
      raise UserError(
        f"{key} {f} is one of the files `curate run` writes in {workdir}; "
        "move it out of the workdir's outputs"
      )
