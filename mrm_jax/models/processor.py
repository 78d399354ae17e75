"""Host-side processing (numpy + PIL, no torch): scoring record → token ids, M-RoPE positions and
vision patches (`encode`), and a list of those → one static-shape batch (`collate`).

Images follow transformers' Qwen2-VL image processor with its PIL backend exactly: RGB conversion
(alpha composited on white), `smart_resize` to multiples of patch_size * merge_size within
[min_pixels, max_pixels], PIL bicubic resize, rescale by 1/255 (in float64, cast to float32),
normalise, and the merge-block-major patch layout `[n, C * tp * p * p]` (an image is a clip of `tp`
copies of itself). A video is a list of frame paths: every frame is resized to the first frame's
`smart_resize` target (video pixel limits) and the clip is padded to a multiple of
`temporal_patch_size` by repeating the last frame, as transformers' video processor does (which
resizes with torchvision; PIL bicubic here can differ by a few grey levels).

Text: the model directory's chat template renders [system?, user (images / videos / text in
order), assistant (answer)]; each `<|vision_start|><|image_pad|><|vision_end|>` is expanded by the
family hook to one pad per merged vision token. `<image>` (`<video>`) placeholders in the question
mark where images (videos) go; without any, they go first. The scored token is the last one (the
newline after the assistant's `<|im_end|>` with Qwen templates). Sequences longer than `max_len` are
cut in the question text first (its end), then the system prompt, then the answer's beginning; the
vision tokens and the final scored token are never cut.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Sequence

import numpy as np
import transformers
from PIL import Image, UnidentifiedImageError

from mrm_jax.data.records import IMAGE_PLACEHOLDER, resolve_image
from mrm_jax.errors import UserError
from mrm_jax.io import read_json_object

VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER_RE = re.compile(r"(<image>|<video>)")
_IMAGE_TRIO = "<|vision_start|><|image_pad|><|vision_end|>"
_VIDEO_TRIO = "<|vision_start|><|video_pad|><|vision_end|>"


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
  """transformers' Qwen2-VL `smart_resize`: both sides multiples of `factor`, area in range, aspect kept."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def to_rgb(image):
  """PIL image → RGB the way transformers does it (transparent pixels composited on white)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")
  return image.convert("RGB")


def _refuse_decompression_bombs() -> None:
  """PIL only warns about an image between MAX_IMAGE_PIXELS and twice that (and raises above): make
  the warning an error too, so such an image is refused with one line instead of being decoded with
  a warning printed among the output. A process-wide filter, checked on each call because
  `warnings.catch_warnings` blocks (pytest's, a caller's) drop it on exit; `catch_warnings` around each
  open would be simpler but is not thread-safe, and images are decoded in tf.data's threads."""

  bomb = Image.DecompressionBombWarning
  if not any(f[0] == "error" and f[2] is bomb for f in warnings.filters):
    warnings.filterwarnings("error", category=bomb)


def load_image(path: str | os.PathLike, where: str = "record", name: str | None = None):
  """An RGB PIL image; a missing, undecodable or too large file is a UserError naming the record and
  the path as given."""
  _refuse_decompression_bombs()
  shown = f"'{name}' ({path})" if name is not None and str(name) != str(path) else f"'{path}'"
  try:
    with Image.open(path) as im:
      im.load()
      return to_rgb(im)
  except FileNotFoundError:
    raise UserError(f"{where}: image {shown} not found") from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise UserError(f"{where}: image {shown} is too large to decode safely ({e})") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:  # truncated, corrupt
    raise UserError(f"{where}: image {shown} cannot be decoded ({type(e).__name__})") from None


def normalize_frames(frames: Sequence, height: int, width: int, settings: dict) -> np.ndarray:
  """RGB PIL frames → resized, rescaled, normalised float32 `[F, C, H, W]`."""
  mean = np.asarray(settings["image_mean"], dtype=np.float32)
  std = np.asarray(settings["image_std"], dtype=np.float32)
  scale = settings.get("rescale_factor", 1 / 255)
  out = []
  for im in frames:
    arr = np.asarray(im.resize((width, height), resample=Image.BICUBIC))  # HWC uint8
    x = (arr.astype(np.float64) * scale).astype(np.float32)
    x = (x - mean) / std
    out.append(np.ascontiguousarray(x.transpose(2, 0, 1)))
  return np.stack(out)


def patchify(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int):
  """`[F, C, H, W]` → (`[gt*gh*gw, C*tp*p*p]` patches, (gt, gh, gw)), merge-block-major like transformers."""
  f, c, h, w = frames.shape
  if pad := -f % temporal_patch_size:
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    f += pad
  gt, gh, gw = f // temporal_patch_size, h // patch_size, w // patch_size
  m, p = merge_size, patch_size
  x = frames.reshape(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return x.reshape(gt * gh * gw, c * temporal_patch_size * p * p), (gt, gh, gw)


def process_image(image, settings: dict):
  """One RGB PIL image → (patches, (1, gh, gw)) with transformers' Qwen2-VL PIL image processor math."""
  factor = settings["patch_size"] * settings["merge_size"]
  h, w = smart_resize(image.height, image.width, factor, settings["min_pixels"], settings["max_pixels"])
  frames = normalize_frames([image], h, w, settings)
  frames = np.repeat(frames, settings["temporal_patch_size"], axis=0)
  return patchify(frames, settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"])


def process_video(frames: Sequence, settings: dict):
  """RGB PIL frames of one clip → (patches, (gt, gh, gw))."""
  factor = settings["patch_size"] * settings["merge_size"]
  h, w = smart_resize(frames[0].height, frames[0].width, factor, settings["min_pixels"], settings["max_pixels"])
  arr = normalize_frames(frames, h, w, settings)
  return patchify(arr, settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"])


@dataclasses.dataclass
class Encoded:
  """One encoded scoring record (numpy, unpadded)."""
  input_ids: np.ndarray                 # [T] int32
  position_ids: np.ndarray              # [3, T] int32
  pixel_values: np.ndarray              # [P, C*tp*p*p] float32 (vision items in order of appearance)
  grid_thw: np.ndarray                  # [n, 3] int32
  patch_arrays: dict[str, np.ndarray]   # family per-patch arrays, first dim P
  truncated: bool = False
  vision_kinds: tuple[str, ...] = ()    # "image" / "video" per row of grid_thw

  @property
  def length(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def num_patches(self) -> int:
    return int(self.pixel_values.shape[0])


def _settings(defaults: dict, override: dict | None, min_pixels=None, max_pixels=None) -> dict:
  s = dict(defaults)
  o = dict(override or {})
  size = o.pop("size", None) or {}
  if not isinstance(size, dict):
    raise UserError("field 'size' should be an object")
  for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor",
            "min_pixels", "max_pixels"):
    if o.get(k) is not None:
      s[k] = o[k]
  if size.get("shortest_edge") is not None:
    s["min_pixels"] = size["shortest_edge"]
  if size.get("longest_edge") is not None:
    s["max_pixels"] = size["longest_edge"]
  if min_pixels is not None:
    s["min_pixels"] = int(min_pixels)
  if max_pixels is not None:
    s["max_pixels"] = int(max_pixels)
  return s


_POSITIVE_INTS = ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels")


def _checked_settings(settings: dict, where: Path) -> dict:
  """Processor settings as the encoder needs them; a wrong value is a UserError naming the file it came
  from (a hand-edited preprocessor_config.json, say), not a traceback from deep in the resize."""
  def bad(key, what):
    raise UserError(f"{where}: field '{key}' should be {what}, got {settings[key]!r}")
  for key in _POSITIVE_INTS:
    v = settings.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      bad(key, "a positive integer")
  for key in ("image_mean", "image_std"):
    v = settings.get(key)
    if v is not None and not (isinstance(v, list) and len(v) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
      bad(key, "a list of 3 finite numbers")
  v = settings.get("rescale_factor")
  if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
    bad("rescale_factor", "a positive number")
  return settings


def _chat_template(f: Path) -> str:
  """The template of chat_template.jinja (text) or chat_template.json ({"chat_template": text})."""
  if f.suffix != ".json":
    try:
      return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise UserError(f"{f}: not valid UTF-8 (byte {e.start})") from None
  template = read_json_object(f).get("chat_template")
  if not isinstance(template, str):
    raise UserError(f"{f}: field 'chat_template' should be a string")
  return template


class Processor:
  """Tokenizer + chat template + image/video settings + the family's hooks."""

  def __init__(self, tokenizer, family: ModuleType, config, image_settings: dict | None = None,
               video_settings: dict | None = None):
    self.tokenizer, self.family, self.config = tokenizer, family, config
    self.image_settings = image_settings or dict(family.IMAGE_DEFAULTS)
    self.video_settings = video_settings or dict(family.VIDEO_DEFAULTS)
    if not getattr(tokenizer, "chat_template", None):
      raise UserError("tokenizer has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)")
    pad = tokenizer.pad_token_id
    if pad is None:
      pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    self.pad_id = int(pad) if pad is not None else 0

  @classmethod
  def from_pretrained(cls, path, family: ModuleType, config, *, min_pixels=None, max_pixels=None) -> "Processor":
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
      raise UserError(f"{path}: no tokenizer (tokenizer.json or vocab.json + merges.txt)")
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tok, "chat_template", None):
      for name in ("chat_template.jinja", "chat_template.json"):
        f = path / name
        if f.is_file():
          tok.chat_template = _chat_template(f)
          break

    def read(name):
      f = path / name
      return read_json_object(f) if f.is_file() else None

    image_cfg = read("preprocessor_config.json")
    video_cfg = read("video_preprocessor_config.json") or {}
    image_file, video_file = path / "preprocessor_config.json", path / "video_preprocessor_config.json"
    try:
      image = _checked_settings(_settings(family.IMAGE_DEFAULTS, image_cfg, min_pixels, max_pixels), image_file)
      video = _settings(family.VIDEO_DEFAULTS, {k: v for k, v in (image_cfg or {}).items()
                                                 if k not in ("min_pixels", "max_pixels", "size")})
      video = _checked_settings(_settings(video, video_cfg), video_file if video_cfg else image_file)
    except UserError as e:
      if not str(e).startswith("field "):
        raise
      raise UserError(f"{image_file}: {e}") from None
    return cls(tok, family, config, image, video)

  # -- text -----------------------------------------------------------------------------------

  def _messages(self, system: str | None, parts: list, answer: str) -> list[dict]:
    content = [{"type": p} if p in ("image", "video") else {"type": "text", "text": p} for p in parts
               if p not in ("",)]
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return msgs + [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]

  def _render(self, system, parts, answer, grids: list[tuple[str, tuple, dict]]) -> list[int]:
    text = self.tokenizer.apply_chat_template(self._messages(system, parts, answer), tokenize=False)
    out, pos, items = [], 0, iter(grids)
    while True:
      i_img, i_vid = text.find(_IMAGE_TRIO, pos), text.find(_VIDEO_TRIO, pos)
      cands = [(i, k) for i, k in ((i_img, "image"), (i_vid, "video")) if i >= 0]
      if not cands:
        break
      i, kind = min(cands)
      item = next(items, None)
      if item is None or item[0] != kind:
        raise ValueError("chat template produced vision placeholders out of order")
      out.append(text[pos:i])
      out.append(self.family.placeholder_text(kind, item[1], self.config, self.image_settings["merge_size"],
                                              **item[2]))
      pos = i + len(_IMAGE_TRIO if kind == "image" else _VIDEO_TRIO)
    out.append(text[pos:])
    return self.tokenizer("".join(out), add_special_tokens=False)["input_ids"]

  # -- encode ---------------------------------------------------------------------------------

  def encode(self, record: dict, image_root, max_len: int, where: str = "record") -> Encoded:
    """A scoring record (`images`, `videos`?, `question`, `answer`, `system`?) → `Encoded`."""
    images = record.get("images") or []
    if isinstance(images, str):
      images = [images]
    videos = record.get("videos") or []
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str):
      raise UserError(f"{where}: 'question' and 'answer' must be strings")
    system = record.get("system")
    # question → ordered parts: text strings and "image"/"video" markers
    pieces = _PLACEHOLDER_RE.split(question)
    n_img, n_vid = pieces.count(IMAGE_PLACEHOLDER), pieces.count(VIDEO_PLACEHOLDER)
    if n_img == 0 and n_vid == 0:
      parts = ["image"] * len(images) + ["video"] * len(videos) + [question]
    else:
      if n_img != len(images) or n_vid != len(videos):
        raise UserError(f"{where}: the question has {n_img} <image> / {n_vid} <video> placeholders but the record "
                        f"has {len(images)} images / {len(videos)} videos")
      parts = [{"<image>": "image", "<video>": "video"}.get(p, p) for p in pieces]
    # vision items in order of appearance
    img_iter, vid_iter = iter(images), iter(videos)
    patches, grids = [], []
    for p in parts:
      if p == "image":
        name = next(img_iter)
        im = load_image(resolve_image(name, image_root, where), where, name)
        x, thw = process_image(im, self.image_settings)
      elif p == "video":
        frames = next(vid_iter)
        if isinstance(frames, str) or not frames:
          raise UserError(f"{where}: each video must be a non-empty list of frame paths")
        ims = [load_image(resolve_image(f, image_root, where), where, f) for f in frames]
        x, thw = process_video(ims, self.video_settings)
      else:
        continue
      patches.append(x)
      # frame timing matters to families that write timestamps into the text (Qwen3-VL)
      grids.append((p, thw, {"num_frames": len(frames)} if p == "video" else {}))
    ids, truncated = self._fit(system, parts, answer, grids, max_len, where)
    grid_thw = np.asarray([g for _, g, _ in grids], dtype=np.int32).reshape(-1, 3)
    ids = np.asarray(ids, dtype=np.int32)
    pos = self.family.rope_index(ids, grid_thw, self.config)
    dim = self.config.vision.patch_dim
    pixels = np.concatenate(patches, 0).astype(np.float32) if patches else np.zeros((0, dim), np.float32)
    arrays = self.family.vision_patch_arrays(grid_thw, self.config)
    return Encoded(ids, pos.astype(np.int32), pixels, grid_thw, arrays, truncated, tuple(k for k, _, _ in grids))

  def _fit(self, system, parts, answer, grids, max_len: int, where: str):
    """Token ids within `max_len`: cut the question text (end), then the system prompt, then the answer's
    beginning; never vision tokens or the final scored token."""
    ids = self._render(system, parts, answer, grids)
    if len(ids) <= max_len:
      return ids, False
    texts = [i for i, p in enumerate(parts) if p not in ("image", "video")]

    def with_question(k):
      out, left = list(parts), k
      for i in texts:
        out[i] = parts[i][:left]
        left -= len(out[i])
      return out

    def largest(fits, n):
      """Largest k in [0, n] with fits(k) (fits is monotone), or -1."""
      if not fits(0):
        return -1
      lo, hi = 0, n
      while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
      return lo

    total = sum(len(parts[i]) for i in texts)
    k = largest(lambda k: len(self._render(system, with_question(k), answer, grids)) <= max_len, total)
    if k >= 0:
      return self._render(system, with_question(k), answer, grids), True
    q0 = with_question(0)
    sys_text = system if system is not None else ""
    k = largest(lambda k: len(self._render(sys_text[:k], q0, answer, grids)) <= max_len, len(sys_text))
    if k >= 0:
      return self._render(sys_text[:k], q0, answer, grids), True
    n = len(answer)
    k = largest(lambda k: len(self._render("", q0, answer[n - k:] if k else "", grids)) <= max_len, n)
    if k >= 0:
      return self._render("", q0, answer[n - k:] if k else "", grids), True
    raise UserError(f"{where}: the images/videos alone need more than max_len={max_len} tokens")

  def collate(self, examples: Sequence[Encoded], seq_len: int, patch_budget: int | None = None,
              strength: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    return collate(examples, seq_len, patch_budget, pad_id=self.pad_id, merge_size=self.config.merge_size,
                   patch_dim=self.config.vision.patch_dim, strength=strength)


def collate(examples: Sequence[Encoded], seq_len: int, patch_budget: int | None = None, *, pad_id: int = 0,
            merge_size: int = 2, patch_dim: int | None = None,
            strength: Sequence[float] | None = None) -> dict[str, np.ndarray]:
  """Static-shape batch (right padding). `patch_budget` (a multiple of merge_size**2) bounds the vision
  patches of the whole batch; None = exactly what the examples need. Each image / video frame gets
  its own vision segment id (1, 2, ...; 0 = padding patch)."""
  b = len(examples)
  unit = merge_size ** 2
  total = sum(e.num_patches for e in examples)
  if patch_budget is None:
    patch_budget = total
  if patch_budget % unit:
    raise ValueError(f"patch_budget {patch_budget} is not a multiple of merge_size**2 = {unit}")
  if total > patch_budget:
    raise ValueError(f"batch needs {total} vision patches, more than patch_budget {patch_budget}")
  if patch_dim is None:
    patch_dim = next((e.pixel_values.shape[1] for e in examples), 0)
  batch = {
      "input_ids": np.full((b, seq_len), pad_id, np.int32),
      "attention_mask": np.zeros((b, seq_len), np.int32),
      "position_ids": np.zeros((3, b, seq_len), np.int32),
      "pixel_values": np.zeros((patch_budget, patch_dim), np.float32),
      "vision_segment_ids": np.zeros((patch_budget,), np.int32),
  }
  for e in examples:
    for name, arr in e.patch_arrays.items():
      if name not in batch:
        batch[name] = np.zeros((patch_budget,) + arr.shape[1:], arr.dtype)
  p0, seg = 0, 0
  offsets: dict[str, int] = {}
  for i, e in enumerate(examples):
    if e.length > seq_len:
      raise ValueError(f"example {i} has {e.length} tokens, more than seq_len {seq_len}")
    batch["input_ids"][i, :e.length] = e.input_ids
    batch["attention_mask"][i, :e.length] = 1
    batch["position_ids"][:, i, :e.length] = e.position_ids
    n = e.num_patches
    batch["pixel_values"][p0:p0 + n] = e.pixel_values
    q = p0
    for t, h, w in e.grid_thw.reshape(-1, 3):
      for _ in range(int(t)):
        seg += 1
        batch["vision_segment_ids"][q:q + h * w] = seg
        q += int(h * w)
    for name, arr in e.patch_arrays.items():
      if name.endswith("_segment_ids"):
        off = offsets.get(name, 0)
        batch[name][p0:p0 + n] = np.where(arr > 0, arr + off, 0)
        offsets[name] = off + int(arr.max(initial=0))
      else:
        batch[name][p0:p0 + n] = arr
    p0 += n
  if strength is not None:
    batch["strength"] = np.asarray(strength, np.float32)
  return batch
