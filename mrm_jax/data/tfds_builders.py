"""TFDS builders: local pair files → versioned, sharded TFDS datasets (nothing is downloaded).

`MrmPairs` reads the files in `manual_dir` with the readers of `mrm_jax.data.readers` and
stores every pair with its images as the original encoded bytes (no decode / re-encode, so a
JPEG stays the same JPEG), plus the image names, so the dataset is self-contained.

Configs:
  pairs       every `*.jsonl` / `*.json` in manual_dir that holds canonical or LLaMA-Factory pairs
              becomes a split named after the file (`train.jsonl` → `train`); other JSON files
              (candidate sets, judgments, ...) are ignored. Images are relative to manual_dir.
  demo_world  the embedded world of `mrm_jax.demo` (`generate_world` output as manual_dir):
              `noisy_pairs.jsonl` → train, `heldout_pairs.jsonl` → test.
  Any other layout: `MrmPairs(config=PairsConfig(name=..., fmt="rlaif_v", splits={...}))` with a
  pair format of `readers.READERS` (embedded images are extracted to a scratch folder first).

    builder = MrmPairs(data_dir=DATA, config="demo_world")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=WORLD))
    ds = builder.as_dataset(split="train")

`entries_from_tfds` turns a prepared split back into pipeline entries (images written once,
content-hashed, to a cache folder), which is how `data.train = "tfds:NAME"` trains.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mrm_jax.data import readers
from mrm_jax.data.pipeline import Entry
from mrm_jax.data.records import normalize_pair, resolve_image
from mrm_jax.errors import UserError


@dataclasses.dataclass(eq=False)
class PairsConfig(tfds.core.BuilderConfig):
  """fmt: a pair format of readers.READERS; splits: {split: file name in manual_dir} (None =
  discover)."""

  fmt: str = "canonical"
  splits: dict | None = None


def _is_pair_file(path: Path) -> bool:
  try:
    _, first = next(iter(readers.iter_rows(path, (".jsonl", ".json"))))
    normalize_pair(first)
    return True
  except (StopIteration, UserError):
    return False


class MrmPairs(tfds.core.GeneratorBasedBuilder):
  """Preference pairs (canonical fields) with embedded encoded image bytes."""

  # TFDS locates a builder's code through `importlib_resources`, which is not a dependency; this
  # file is the code (and there is no checksums file: nothing is downloaded).
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Canonical pairs; images as original encoded bytes plus their names."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put the pair files (canonical or LLaMA-Factory JSONL/JSON, one split per file) and their "
    "images in "
    "manual_dir; image paths in the records are relative to it. Nothing is downloaded."
  )
  BUILDER_CONFIGS = [
    PairsConfig(name="pairs", description="every pair file in manual_dir, one split per file"),
    PairsConfig(
      name="demo_world",
      description="the embedded demo world (mrm_jax.demo)",
      splits={"train": "noisy_pairs.jsonl", "test": "heldout_pairs.jsonl"},
    ),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "id": text,
          "question": text,
          "chosen": text,
          "rejected": text,
          "system": text,
          "source": text,
          "strength": tfds.features.Scalar(np.float32),
          "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
          "image_names": tfds.features.Sequence(text),
          "meta": text,  # JSON
        }
      ),
      description="Multimodal preference pairs for reward-model training (DESIGN §3.2).",
    )

  def _split_generators(self, dl_manager):
    try:
      manual = Path(dl_manager.manual_dir)
    except AssertionError:  # TFDS asserts on a missing or empty manual_dir
      raise UserError(f"{dl_manager._manual_dir}: manual_dir is missing or empty") from None
    if self.builder_config.splits:
      files = {split: manual / name for split, name in self.builder_config.splits.items()}
      for f in files.values():
        if not f.is_file():
          raise UserError(f"{f}: no such file (config '{self.builder_config.name}')")
    else:
      files = {
        f.stem.replace("-", "_"): f
        for f in sorted(manual.iterdir())
        if f.suffix in (".jsonl", ".json")
        and (self.builder_config.fmt != "canonical" or _is_pair_file(f))
      }
      if not files:
        raise UserError(f"{manual}: no pair files found")
    return {split: self._generate_examples(f, manual) for split, f in files.items()}

  def _generate_examples(self, path: Path, root: Path):
    with tempfile.TemporaryDirectory(prefix="mrm-tfds-") as scratch:
      store = readers.ImageStore(scratch, relative_to=scratch)
      for where, pair in readers.read(path, self.builder_config.fmt, store):
        # extracted (embedded) images live in scratch, path images under manual_dir
        images = [
          resolve_image(p, scratch if (Path(scratch) / p).is_file() else root, where).read_bytes()
          for p in pair["images"]
        ]
        yield (
          where,
          {
            "id": pair.get("id", ""),
            "question": pair["question"],
            "chosen": pair["chosen"],
            "rejected": pair["rejected"],
            "system": pair.get("system") or "",
            "source": pair.get("source") or "",
            "strength": np.float32(pair.get("strength") or 0.0),
            "images": images,
            "image_names": list(pair["images"]),
            "meta": json.dumps(pair.get("meta") or {}, ensure_ascii=False, sort_keys=True),
          },
        )


def example_to_pair(ex: dict) -> dict:
  """A TFDS example (numpy, from `tfds.as_numpy`) → canonical pair with `images` = the stored
  names."""
  dec = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  pair = {
    "id": dec(ex["id"]),
    "images": [dec(n) for n in ex["image_names"]],
    "question": dec(ex["question"]),
    "chosen": dec(ex["chosen"]),
    "rejected": dec(ex["rejected"]),
    "strength": float(ex["strength"]),
  }
  for key in ("system", "source"):
    if dec(ex[key]):
      pair[key] = dec(ex[key])
  meta = json.loads(dec(ex["meta"]))
  if meta:
    pair["meta"] = meta
  return pair


def entries_from_tfds(name: str, split: str, data_dir: str | None, cache_dir: str | Path):
  """A prepared TFDS split → pipeline `Entry`s; images are written to `cache_dir` under
  content-hashed names and the entries point at them (image root = cache_dir)."""
  ds = tfds.load(name, split=split, data_dir=data_dir, download=False, shuffle_files=False)
  cache_dir = Path(cache_dir)
  store = readers.ImageStore(cache_dir, relative_to=cache_dir)
  entries = []
  for n, ex in enumerate(tfds.as_numpy(ds), 1):
    where = f"tfds:{name}/{split}:{n}"
    pair = example_to_pair(ex)
    try:
      pair["images"] = [store.put(bytes(b), where) for b in ex["images"]]
    except (
      UserError
    ) as e:  # unknown image bytes: skipped and counted by the pipeline like any bad record
      entries.append(Entry(where, None, str(cache_dir), str(e).split(": ", 1)[-1]))
      continue
    entries.append(Entry(where, pair, str(cache_dir)))
  return entries
