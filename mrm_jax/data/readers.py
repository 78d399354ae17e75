"""Readers for the native dataset layouts of DESIGN §3.3.

Every reader is a generator `read_FMT(path, images) -> Iterator[(where, record)]`:
`where` is `file:line` (JSON Lines), `file:item` (JSON list) or `file:row` (parquet, 1-based
over the whole file) so a later step can name the source of a bad record; `record` is a
canonical preference pair (DESIGN §3.2) for the pair formats, and a T2I record
`{"id", "caption", "chosen_image", "rejected_image"}` for the T2I formats (`pickapic`,
`hpdv2`, `imagereward`), which `mrm_jax.construct.t2i` turns into two-image pairs.

`images` is an `ImageStore`: embedded image bytes (parquet `{"bytes", "path"}` structs,
Pick-a-Pic's `jpg_0`) are written once, under content-hashed names, into a folder next to
the output, and records refer to them by paths relative to the output's folder. Image paths
that the dataset already stores as paths are kept unchanged: they stay relative to the
dataset's own image folder (pass it as `--image-root` when scoring/training).

Readers are strict: a record that does not fit its layout is a `UserError` naming where it is.
Only local files are read; nothing is downloaded. A `path` may be a folder, in which case
every file of the format's extensions in it is read, in sorted order (sharded releases).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mrm_jax.data.records import describe_types, is_finite_number, normalize_pair
from mrm_jax.errors import UserError, at
from mrm_jax.io import json_type, non_finite_path, read_json_or_jsonl

Where = str

# Magic numbers → file extension for embedded image bytes.
_MAGIC = (
  (b"\xff\xd8\xff", ".jpg"),
  (b"\x89PNG\r\n\x1a\n", ".png"),
  (b"GIF87a", ".gif"),
  (b"GIF89a", ".gif"),
  (b"BM", ".bmp"),
  (b"II*\x00", ".tif"),
  (b"MM\x00*", ".tif"),
)


def image_extension(data: bytes) -> str | None:
  """The file extension of encoded image bytes, from their magic number (None if unknown)."""
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return ".webp"
  for magic, ext in _MAGIC:
    if data.startswith(magic):
      return ext
  return None


class ImageStore:
  """Writes embedded image bytes to `folder` as `<sha256[:16]><ext>`; paths are returned
  relative to `relative_to` (the output file's folder).

  Identical bytes map to one file, so re-running a conversion or converting overlapping
  shards never duplicates images. `created` lists the files this store wrote (and that did
  not exist before), so a failed conversion can remove exactly those.
  """

  def __init__(self, folder: str | os.PathLike, relative_to: str | os.PathLike):
    self.folder = Path(folder)
    self.relative_to = Path(relative_to)
    self.created: list[Path] = []
    self.returned: set[str] = set()  # the paths put() gave out

  def put(self, data: bytes, where: Where) -> str:
    if not isinstance(data, (bytes, bytearray)) or not data:
      raise UserError(f"{where}: embedded image has no bytes")
    ext = image_extension(bytes(data[:16]))
    if ext is None:
      raise UserError(f"{where}: embedded image bytes are not a known image format")
    name = hashlib.sha256(data).hexdigest()[:16] + ext
    target = self.folder / name
    if not target.exists():
      self.folder.mkdir(parents=True, exist_ok=True)
      tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
      tmp.write_bytes(data)
      os.replace(tmp, target)
      self.created.append(target)
    rel = os.path.relpath(target, self.relative_to).replace(os.sep, "/")
    self.returned.add(rel)
    return rel

  def remove_created(self) -> None:
    for p in self.created:
      p.unlink(missing_ok=True)
    self.created.clear()


# ----------------------------------------------------------------------------- raw rows


def _files(path: str | os.PathLike, exts: tuple[str, ...]) -> list[Path]:
  path = Path(path)
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(exts))
    if not files:
      raise UserError(f"{path}: no {'/'.join(exts)} files in this folder")
    return files
  if not path.is_file():
    raise UserError(f"{path}: no such file")
  return [path]


def _parquet_rows(path: Path) -> Iterator[tuple[Where, dict]]:
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several unrelated types for a broken file
    raise UserError(f"{path}: not a readable parquet file ({e})") from None
  row = 0
  for batch in pf.iter_batches(batch_size=256):
    for rec in batch.to_pylist():
      row += 1
      yield at(path, row), rec


def iter_rows(
  path: str | os.PathLike, exts=(".parquet", ".jsonl", ".json")
) -> Iterator[tuple[Where, dict]]:
  """(where, raw row) from parquet, JSON Lines or JSON-list files (or a folder of them)."""
  for f in _files(path, exts):
    if f.suffix == ".parquet":
      yield from _parquet_rows(f)
    else:
      for n, rec in read_json_or_jsonl(f):
        yield at(f, n), rec


# ----------------------------------------------------------------------------- field helpers


def _get(rec: dict, keys: str | tuple[str, ...], where: Where, types=str) -> Any:
  """The first present key of `keys`; UserError if none is present or the type is wrong."""
  keys = (keys,) if isinstance(keys, str) else keys
  for k in keys:
    if rec.get(k) is not None:
      if not isinstance(rec[k], types) or isinstance(rec[k], bool):
        raise UserError(
          f"{where}: field '{k}' should be {describe_types(types)}, got {json_type(rec[k])}"
        )
      return rec[k]
  raise UserError(
    f"{where}: missing field '{keys[0]}'"
    + (f" (or {', '.join(keys[1:])})" if len(keys) > 1 else "")
  )


def _image(value: Any, store: ImageStore | None, where: Where) -> str:
  """One image field → a path: a path string, raw bytes, or a HF `{"bytes", "path"}` struct."""
  if isinstance(value, str):
    return value
  if isinstance(value, (bytes, bytearray)):
    if store is None:
      raise UserError(f"{where}: embedded image bytes need an output folder to be extracted to")
    return store.put(bytes(value), where)
  if isinstance(value, dict):
    if value.get("bytes"):
      return _image(value["bytes"], store, where)
    if isinstance(value.get("path"), str) and value["path"]:
      return value["path"]
  raise UserError(f"{where}: image field holds neither a path nor image bytes")


def _images(
  rec: dict, store: ImageStore | None, where: Where, keys=("image", "image_path", "images")
) -> list[str]:
  for k in keys:
    v = rec.get(k)
    if v is None:
      continue
    if isinstance(v, list):
      return [_image(x, store, where) for x in v]
    return [_image(v, store, where)]
  return []


def _pair(pid, images, question, chosen, rejected, source, where, **extra) -> dict:
  for name, v in (("question", question), ("chosen", chosen), ("rejected", rejected)):
    if not isinstance(v, str):
      raise UserError(f"{where}: field '{name}' should be str")
  pair = {
    "id": str(pid),
    "images": images,
    "question": question,
    "chosen": chosen,
    "rejected": rejected,
    "source": source,
  }
  for k, v in extra.items():
    if v is not None and v != {}:
      bad = non_finite_path(
        {k: v}
      )  # a parquet NaN would make the output unwritable (NaN is not JSON)
      if bad is not None:
        raise UserError(f"{where}: field '{bad}' is NaN or infinite")
      pair[k] = v
  return pair


def _row_id(rec: dict, where: Where, keys=("id", "idx", "ID")) -> str:
  for k in keys:
    if rec.get(k) is not None:
      if isinstance(rec[k], bool) or not isinstance(rec[k], (str, int)):
        raise UserError(
          f"{where}: field '{k}' should be a string or an integer, got {json_type(rec[k])}"
        )
      return str(rec[k])
  return where.rsplit("/", 1)[-1]  # file:line is unique and stable


# ----------------------------------------------------------------------------- pair formats


def read_canonical(path, images: ImageStore | None = None) -> Iterator[tuple[Where, dict]]:
  """Canonical pair files, or LLaMA-Factory files (JSON list or JSONL): both are accepted."""
  for where, rec in iter_rows(path, (".jsonl", ".json")):
    yield where, normalize_pair(rec, where)


read_llamafactory = read_canonical


def read_rlaif_v(path, images: ImageStore | None = None) -> Iterator[tuple[Where, dict]]:
  """RLAIF-V (openbmb/RLAIF-V-Dataset).

  Parquet release columns: `ds_name, image {bytes, path}, question, chosen, rejected,
  origin_dataset, origin_split, idx, image_path`; a JSONL export holds the same keys with
  `image` (or `image_path`) a path. The embedded bytes win over `image_path`, which in the
  release names a file that is not shipped.
  """
  for where, rec in iter_rows(path):
    imgs = _images(rec, images, where, keys=("image", "image_path"))
    meta = {
      k: rec[k] for k in ("ds_name", "origin_dataset", "origin_split") if rec.get(k) is not None
    }
    yield (
      where,
      _pair(
        _row_id(rec, where),
        imgs,
        _get(rec, "question", where),
        _get(rec, "chosen", where),
        _get(rec, "rejected", where),
        "rlaif_v",
        where,
        meta=meta,
      ),
    )


def _rating(value, where: Where) -> float | None:
  try:
    r = float(value)
  except (TypeError, ValueError):
    return None  # "N/A" and missing ratings carry no signal
  if math.isinf(r):
    raise UserError(f"{where}: rating {value!r:.40} is not a finite number")
  return None if math.isnan(r) else r


def _vlf_completions(rec: dict, where: Where) -> list[tuple[str, str, float | None]]:
  """VLFeedback completions → [(model, response, mean rating)].

  Accepts the GitHub JSON layout (a list of `{"model", "response", "annotations": {aspect:
  {"Rating", "Rationale"}}}`) and the Hugging Face parquet layout, where datasets stores
  the same sequence of dicts column-wise (`{"model": [...], "response": [...],
  "annotations": [...]}`).
  """
  comps = rec.get("completions")
  if isinstance(comps, dict):
    keys = list(comps)
    n = len(comps.get("response") or [])
    comps = [
      {k: comps[k][i] for k in keys if isinstance(comps[k], list) and i < len(comps[k])}
      for i in range(n)
    ]
  if not isinstance(comps, list) or not comps:
    raise UserError(f"{where}: missing field 'completions'")
  out = []
  for c in comps:
    if not isinstance(c, dict) or not isinstance(c.get("response"), str):
      raise UserError(f"{where}: each completion needs a 'response' string")
    ann = c.get("annotations") or {}
    if isinstance(ann, list):  # some exports wrap the aspect dict in a one-element list
      ann = ann[0] if ann and isinstance(ann[0], dict) else {}
    if not isinstance(ann, dict):
      raise UserError(
        f"{where}: a completion's 'annotations' should be an object, got {json_type(ann)}"
      )
    ratings = [_rating(v.get("Rating") if isinstance(v, dict) else v, where) for v in ann.values()]
    ratings = [r for r in ratings if r is not None]
    out.append(
      (str(c.get("model", "")), c["response"], sum(ratings) / len(ratings) if ratings else None)
    )
  return out


def read_vlfeedback(
  path, images: ImageStore | None = None, min_gap: float = 1e-9
) -> Iterator[tuple[Where, dict]]:
  """VLFeedback (MMInstruction/VLFeedback): `id, prompt (or instruction), image, models,
  completions` with per-aspect GPT-4V ratings (Helpfulness, Visual Faithfulness, Ethical
  Considerations; "N/A" ignored).

  A completion's score is the mean of its numeric ratings (Silkie's choice). Every pair of
  completions with different text whose scores differ by more than `min_gap` becomes a
  pair: chosen = higher score, `strength` = the gap, ids `"{id}:{i}-{j}"` (i < j, the
  completions' stored indices). Completions without any rating are left out.
  """
  for where, rec in iter_rows(path):
    pid = _row_id(rec, where)
    question = _get(rec, ("prompt", "instruction", "question"), where)
    imgs = _images(rec, images, where, keys=("image", "image_path"))
    comps = _vlf_completions(rec, where)
    for i, j in itertools.combinations(range(len(comps)), 2):
      (_, ri, si), (_, rj, sj) = comps[i], comps[j]
      if si is None or sj is None or ri == rj or abs(si - sj) <= min_gap:
        continue
      (cm, c, cs), (rm, r, rs) = (comps[i], comps[j]) if si > sj else (comps[j], comps[i])
      yield (
        where,
        _pair(
          f"{pid}:{i}-{j}",
          list(imgs),
          question,
          c,
          r,
          "vlfeedback",
          where,
          strength=float(cs - rs),
          meta={"models": [cm, rm], "scores": [cs, rs]},
        ),
      )


def _mm_rlhf_media(rec: dict, where: Where) -> dict:
  """MM-RLHF media: `image` (a path) or `video` (a folder of frames) → images / videos."""
  if rec.get("video") is not None:
    v = rec["video"]
    videos = v if isinstance(v, list) else [v]
    if not videos or not all(isinstance(x, str) and x for x in videos):
      raise UserError(f"{where}: field 'video' should be a frame folder path, got {json_type(v)}")
    return {"images": [], "videos": videos}
  return {"images": _images(rec, None, where, keys=("image", "image_path", "images"))}


def read_mm_rlhf(path, images: ImageStore | None = None) -> Iterator[tuple[Where, dict]]:
  """MM-RLHF pairs (yfzhang114/MM-RLHF): `id, image | video, prompt (or question), chosen,
  rejected, chosen_reason?, rejected_reason?` — the layout its reward-model benchmark shares.

  A video item points at a folder of frames; it is kept as `videos: [folder]` (LLaMA-Factory's
  key) with `images: []`. The annotators' reasons are kept in `meta`.
  """
  for where, rec in iter_rows(path):
    meta = {k: rec[k] for k in ("chosen_reason", "rejected_reason") if rec.get(k) is not None}
    media = _mm_rlhf_media(rec, where)
    pair = _pair(
      _row_id(rec, where),
      media["images"],
      _get(rec, ("prompt", "question"), where),
      _get(rec, "chosen", where),
      _get(rec, "rejected", where),
      "mm_rlhf",
      where,
      meta=meta,
    )
    if "videos" in media:
      pair["videos"] = media["videos"]
    yield where, pair


# ----------------------------------------------------------------------------- benchmarks as pairs


def read_vl_rewardbench(path, images: ImageStore | None = None) -> Iterator[tuple[Where, dict]]:
  """VL-RewardBench: `id, query, image (HF parquet: {bytes, path}) | image_path (GitHub JSONL),
  response [2], human_ranking [2], models, ...`.

  `human_ranking[k]` is the rank of `response[k]` (0 = preferred), so chosen =
  `response[argmin(human_ranking)]`; it must be a permutation of 0..n-1 (a tie is an error: the
  benchmark has none). The order in the file is kept, as benchmark score files are matched line
  by line.
  """
  for where, rec in iter_rows(path):
    resp = _get(rec, "response", where, list)
    rank = _get(rec, "human_ranking", where, list)
    if len(resp) != 2 or not all(isinstance(r, str) for r in resp):
      raise UserError(f"{where}: 'response' must hold two strings")
    if (
      len(rank) != len(resp)
      or not all(isinstance(r, int) and not isinstance(r, bool) for r in rank)
      or sorted(rank) != list(range(len(resp)))
    ):
      raise UserError(
        f"{where}: 'human_ranking' must rank the {len(resp)} responses 0..{len(resp) - 1} "
        f"(a permutation), got {rank!r:.60}"
      )
    best = rank.index(0)
    meta = {
      k: rec[k]
      for k in ("models", "query_source", "human_ranking", "ground_truth")
      if rec.get(k) is not None
    }
    yield (
      where,
      _pair(
        _get(rec, "id", where),
        _images(rec, images, where, keys=("image", "image_path")),
        _get(rec, "query", where),
        resp[best],
        resp[1 - best],
        "vl_rewardbench",
        where,
        meta=meta,
      ),
    )


def read_multimodal_rewardbench(
  path, images: ImageStore | None = None
) -> Iterator[tuple[Where, dict]]:
  """Multimodal RewardBench (facebookresearch/multimodal_rewardbench): `ID, Text, Image (a path),
  Output1, Output2, Better ("Output1" | "Output2"), Category, Meta`. chosen = the output
  `Better` names; `Category` and `Meta` are kept in `meta` (the evaluator splits categories)."""
  for where, rec in iter_rows(path):
    better = _get(rec, "Better", where)
    if better not in ("Output1", "Output2"):
      raise UserError(f"{where}: 'Better' must be 'Output1' or 'Output2', got {better!r}")
    worse = "Output2" if better == "Output1" else "Output1"
    meta = {k.lower(): rec[k] for k in ("Category", "Meta", "Better") if rec.get(k) is not None}
    yield (
      where,
      _pair(
        _get(rec, "ID", where, (str, int)),
        _images(rec, images, where, keys=("Image", "image")),
        _get(rec, "Text", where),
        _get(rec, better, where),
        _get(rec, worse, where),
        "multimodal_rewardbench",
        where,
        meta=meta,
      ),
    )


def read_mm_rlhf_rewardbench(
  path, images: ImageStore | None = None
) -> Iterator[tuple[Where, dict]]:
  """MM-RLHF-RewardBench: `id, image | video, prompt, chosen, rejected, chosen_reason,
  rejected_reason`; ids repeat (several pairs per id). Same layout as MM-RLHF pairs."""
  for where, pair in read_mm_rlhf(path, images):
    pair["source"] = "mm_rlhf_rewardbench"
    yield where, pair


# ----------------------------------------------------------------------------- T2I formats


def _t2i(pid: str, caption: str, chosen: str, rejected: str, source: str) -> dict:
  return {
    "id": pid,
    "caption": caption,
    "chosen_image": chosen,
    "rejected_image": rejected,
    "source": source,
  }


def read_pickapic(path, images: ImageStore | None = None) -> Iterator[tuple[Where, dict]]:
  """Pick-a-Pic v2 (yuvalkirstain/pickapic_v2) parquet: `caption, jpg_0, jpg_1 (JPEG bytes),
  label_0, label_1 (1/0, or 0.5/0.5 for a tie), ranking_id, has_label, ...`.

  Ties and unlabelled rows (`has_label` false) are dropped. Ids are `ranking_id` when present.
  """
  for where, rec in iter_rows(path, (".parquet",)):
    if rec.get("has_label") is False:
      continue
    l0, l1 = _get(rec, "label_0", where, (int, float)), _get(rec, "label_1", where, (int, float))
    if not (is_finite_number(l0) and is_finite_number(l1)):
      raise UserError(
        f"{where}: 'label_0' and 'label_1' should be finite numbers, got {l0!r}, {l1!r}"
      )
    if l0 == l1:
      continue
    img0 = _image(_get(rec, "jpg_0", where, (bytes, dict)), images, where)
    img1 = _image(_get(rec, "jpg_1", where, (bytes, dict)), images, where)
    chosen, rejected = (img0, img1) if l0 > l1 else (img1, img0)
    yield (
      where,
      _t2i(
        _row_id(rec, where, ("ranking_id", "id")),
        _get(rec, "caption", where),
        chosen,
        rejected,
        "pickapic",
      ),
    )


def _ranked_pairs(ranks: list, better_is_lower: bool) -> Iterator[tuple[int, int]]:
  """(better, worse) for every strictly ordered pair of positions, in (i, j) order, i < j."""
  for i, j in itertools.combinations(range(len(ranks)), 2):
    if ranks[i] == ranks[j]:
      continue
    i_better = (ranks[i] < ranks[j]) == better_is_lower
    yield (i, j) if i_better else (j, i)


def _numbers(v, n: int, name: str, where: Where) -> list:
  if not isinstance(v, list) or len(v) != n or not all(is_finite_number(x) for x in v):
    raise UserError(f"{where}: '{name}' must hold {n} numbers, one per image")
  return v


def read_hpdv2(path, images: ImageStore | None = None) -> Iterator[tuple[Where, dict]]:
  """HPDv2 (xswu/HPDv2) JSON list: train `{"prompt", "image_path": [a, b], "human_preference":
  [1, 0]}` (1 marks the preferred image); test `{"prompt", "image_path": [...], "rank": [...]}`
  (assumed 1 = best). Every strictly ordered pair of images is a T2I record
  `"{id}:{better}-{worse}"`; equal preferences give nothing. Image paths stay relative to
  the dataset's image folder.
  """
  for where, rec in iter_rows(path, (".json", ".jsonl")):
    paths = _get(rec, ("image_path", "image_paths", "images"), where, list)
    if not all(isinstance(p, str) for p in paths):
      raise UserError(f"{where}: 'image_path' must be a list of paths")
    if rec.get("human_preference") is not None:
      ranks, lower = _numbers(rec["human_preference"], len(paths), "human_preference", where), False
    else:
      ranks, lower = _numbers(_get(rec, "rank", where, list), len(paths), "rank", where), True
    pid, caption = _row_id(rec, where), _get(rec, ("prompt", "caption"), where)
    for b, w in _ranked_pairs(ranks, better_is_lower=lower):
      yield where, _t2i(f"{pid}:{b}-{w}", caption, paths[b], paths[w], "hpdv2")


def read_imagereward(path, images: ImageStore | None = None) -> Iterator[tuple[Where, dict]]:
  """ImageReward (THUDM/ImageReward training JSON): `{"id", "prompt", "generations": [paths],
  "ranking": [ranks]}` with rank 1 the best and ties allowed (ImageRewardDB metadata names
  the same fields `prompt_id`, `image_path`, `rank`). Every strictly ordered pair of
  generations is a T2I record `"{id}:{better}-{worse}"`, as ImageReward's own
  `make_dataset.py` builds its training pairs.
  """
  for where, rec in iter_rows(path):
    paths = _get(rec, ("generations", "image_path", "images"), where, list)
    if not all(isinstance(p, (str, dict, bytes)) for p in paths):
      raise UserError(f"{where}: 'generations' must be a list of image paths")
    paths = [_image(p, images, where) for p in paths]
    ranks = _numbers(_get(rec, ("ranking", "rank"), where, list), len(paths), "ranking", where)
    pid, caption = _row_id(rec, where, ("id", "prompt_id")), _get(rec, "prompt", where)
    for b, w in _ranked_pairs(ranks, better_is_lower=True):
      yield where, _t2i(f"{pid}:{b}-{w}", caption, paths[b], paths[w], "imagereward")


READERS: dict[str, Callable[..., Iterator[tuple[Where, dict]]]] = {
  "canonical": read_canonical,
  "llamafactory": read_llamafactory,
  "rlaif_v": read_rlaif_v,
  "vlfeedback": read_vlfeedback,
  "mm_rlhf": read_mm_rlhf,
  "pickapic": read_pickapic,
  "hpdv2": read_hpdv2,
  "imagereward": read_imagereward,
  "vl_rewardbench": read_vl_rewardbench,
  "multimodal_rewardbench": read_multimodal_rewardbench,
  "mm_rlhf_rewardbench": read_mm_rlhf_rewardbench,
}
T2I_FORMATS = frozenset({"pickapic", "hpdv2", "imagereward"})


def read(path, fmt: str, images: ImageStore | None = None) -> Iterator[tuple[Where, dict]]:
  """(where, record) for every record of `path` in native format `fmt` (a key of READERS)."""
  if fmt not in READERS:
    raise UserError(f"unknown format '{fmt}' (choose from {', '.join(READERS)})")
  return READERS[fmt](path, images)


def read_all(path, fmt: str, images: ImageStore | None = None) -> list[dict]:
  return [r for _, r in read(path, fmt, images)]
