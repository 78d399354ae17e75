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
import logging
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import transformers
from PIL import Image, UnidentifiedImageError

from mrm_jax.data.records import IMAGE_PLACEHOLDER, resolve_image
from mrm_jax.errors import UserError
from mrm_jax.io import read_json_object
from mrm_jax.models import pair_layout, vision_layout

VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER_RE = re.compile(r"(<image>|<video>)")
# LLaMA-Factory's model_args defaults (image_max_pixels, image_min_pixels)
LF_IMAGE_MAX_PIXELS = 768 * 768
LF_IMAGE_MIN_PIXELS = 32 * 32
IMAGE_PREPROCESS = ("transformers", "llamafactory")
# LLaMA-Factory 0.9 chat templates of the Qwen-VL families: name → (default system, text put before
# every answer); all are ChatML (qwen2_vl serves Qwen2.5-VL too).
TEMPLATES = {
  "qwen2_vl": ("You are a helpful assistant.", ""),
  "qwen3_vl": ("", "<think>\n\n</think>\n\n"),
  "qwen3_vl_nothink": ("", ""),
}
_IMAGE_TRIO = "<|vision_start|><|image_pad|><|vision_end|>"
_VIDEO_TRIO = "<|vision_start|><|video_pad|><|vision_end|>"

log = logging.getLogger(__name__)


def smart_resize(
  height: int,
  width: int,
  factor: int = 28,
  min_pixels: int = 56 * 56,
  max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
  """transformers' Qwen2-VL `smart_resize`: both sides multiples of `factor`, area in range, aspect
  kept."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(
      "absolute aspect ratio must be smaller than 200, got "
      f"{max(height, width) / min(height, width)}"
    )
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
  `warnings.catch_warnings` blocks (pytest's, a caller's) drop it on exit; `catch_warnings` around
  each
  open would be simpler but is not thread-safe, and images are decoded in tf.data's threads."""

  bomb = Image.DecompressionBombWarning
  if not any(f[0] == "error" and f[2] is bomb for f in warnings.filters):
    warnings.filterwarnings("error", category=bomb)


def open_image(path: str | os.PathLike, where: str = "record", name: str | None = None):
  """The decoded PIL image as stored (any mode); a missing, undecodable or too large file is a
  UserError naming the record and the path as given."""
  _refuse_decompression_bombs()
  shown = f"'{name}' ({path})" if name is not None and str(name) != str(path) else f"'{path}'"
  try:
    with Image.open(path) as im:
      im.load()
      return im
  except FileNotFoundError:
    raise UserError(f"{where}: image {shown} not found") from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise UserError(f"{where}: image {shown} is too large to decode safely ({e})") from None
  except (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
  ) as e:  # truncated, corrupt
    raise UserError(f"{where}: image {shown} cannot be decoded ({type(e).__name__})") from None


def load_image(path: str | os.PathLike, where: str = "record", name: str | None = None):
  """An RGB PIL image the way transformers converts it (see `open_image` and `to_rgb`)."""
  return to_rgb(open_image(path, where, name))


def llamafactory_image(
  image, max_pixels: int = LF_IMAGE_MAX_PIXELS, min_pixels: int = LF_IMAGE_MIN_PIXELS
):
  """LLaMA-Factory 0.9's Qwen-VL image regularisation (`Qwen2VLPlugin._preprocess_image`), step for
  step: shrink to at most `max_pixels` (its image_max_pixels), enlarge to at least `min_pixels`,
  stretch a side under 28 px to 28, cap the aspect ratio at 180, each a PIL resize with PIL's
  default filter; then `convert("RGB")`, which drops alpha (no compositing on white)."""
  if image.width * image.height > max_pixels:
    f = math.sqrt(max_pixels / (image.width * image.height))
    image = image.resize((int(image.width * f), int(image.height * f)))
  if image.width * image.height < min_pixels:
    f = math.sqrt(min_pixels / (image.width * image.height))
    image = image.resize((int(image.width * f), int(image.height * f)))
  if image.mode != "RGB":
    image = image.convert("RGB")
  if min(image.width, image.height) < 28:
    image = image.resize((max(image.width, 28), max(image.height, 28)))
  if image.width / image.height > 200:
    image = image.resize((image.height * 180, image.height))
  if image.height / image.width > 200:
    image = image.resize((image.width, image.width * 180))
  return image


def _bicubic_coefficients(in_size: int, out_size: int, precision: int | None):
  """Fixed-point antialiased bicubic (a = -0.5) weights, PIL's `precompute_coeffs`: `(first index
  [out], integer weights [out, K], precision bits)`. `precision=None` picks torch's uint8 kernel's
  (the most bits keeping the largest weight under 2**15), 22 is PIL's."""
  scale = in_size / out_size
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  k = int(math.ceil(support)) * 2 + 1
  first = np.zeros(out_size, np.int64)
  weights = np.zeros((out_size, k), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    n = min(min(int(center + support + 0.5), in_size) - lo, k)
    x = np.abs((np.arange(n) + lo - center + 0.5) * inv)
    w = np.where(
      x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0)
    )
    total = w.sum()
    first[i], weights[i, :n] = lo, (w / total if total != 0 else w)
  if precision is None:
    w_max, precision = weights.max(), 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
      precision += 1
  scaled = weights * (1 << precision)
  fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
  return first, fixed, precision


def _resample_axis(arr: np.ndarray, out_size: int, axis: int, precision: int | None) -> np.ndarray:
  first, w, bits = _bicubic_coefficients(arr.shape[axis], out_size, precision)
  src = np.moveaxis(arr, axis, 0).astype(np.int64)
  acc = np.full((out_size,) + src.shape[1:], 1 << (bits - 1), np.int64)
  expand = (slice(None),) + (None,) * (src.ndim - 1)
  for j in range(w.shape[1]):
    idx = np.minimum(first + j, src.shape[0] - 1)
    acc += src[idx] * w[:, j][expand]
  return np.moveaxis(np.clip(acc >> bits, 0, 255).astype(np.uint8), 0, axis)


def resize_bicubic_uint8(
  arr: np.ndarray, height: int, width: int, precision: int | None = None
) -> np.ndarray:
  """HWC uint8 → (height, width) with the fixed-point antialiased bicubic of PIL (`precision=22`)
  or of torch's uint8 CPU kernel, which transformers' torchvision backend runs (`None`): a
  horizontal pass to uint8, then a vertical one."""
  if arr.shape[1] != width:
    arr = _resample_axis(arr, width, 1, precision)
  if arr.shape[0] != height:
    arr = _resample_axis(arr, height, 0, precision)
  return arr


def normalize_frames(
  frames: Sequence, height: int, width: int, settings: dict, backend: str = "pil"
) -> np.ndarray:
  """RGB PIL frames → resized, rescaled, normalised float32 `[F, C, H, W]`, as transformers' image
  processor does it with its PIL backend (`"pil"`) or its torchvision one (`"torchvision"`: torch's
  uint8 bicubic, and rescale fused into a float32 normalisation)."""
  mean = np.asarray(settings["image_mean"], dtype=np.float32)
  std = np.asarray(settings["image_std"], dtype=np.float32)
  scale = settings.get("rescale_factor", 1 / 255)
  out = []
  for im in frames:
    if backend == "torchvision":
      arr = resize_bicubic_uint8(np.asarray(im), height, width)
      inv = np.float32(1.0 / scale)
      x = (arr.astype(np.float32) - mean * inv) / (std * inv)
    else:
      arr = np.asarray(im.resize((width, height), resample=Image.BICUBIC))  # HWC uint8
      x = (arr.astype(np.float64) * scale).astype(np.float32)
      x = (x - mean) / std
    out.append(np.ascontiguousarray(x.transpose(2, 0, 1)))
  return np.stack(out)


def patchify(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int):
  """`[F, C, H, W]` → (`[gt*gh*gw, C*tp*p*p]` patches, (gt, gh, gw)), merge-block-major like
  transformers."""
  f, c, h, w = frames.shape
  if pad := -f % temporal_patch_size:
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    f += pad
  gt, gh, gw = f // temporal_patch_size, h // patch_size, w // patch_size
  m, p = merge_size, patch_size
  x = frames.reshape(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return x.reshape(gt * gh * gw, c * temporal_patch_size * p * p), (gt, gh, gw)


def process_image(image, settings: dict, backend: str = "pil"):
  """One RGB PIL image → (patches, (1, gh, gw)) with transformers' Qwen2-VL image processor math
  (`backend` as in `normalize_frames`)."""
  factor = settings["patch_size"] * settings["merge_size"]
  h, w = smart_resize(
    image.height, image.width, factor, settings["min_pixels"], settings["max_pixels"]
  )
  frames = normalize_frames([image], h, w, settings, backend)
  frames = np.repeat(frames, settings["temporal_patch_size"], axis=0)
  return patchify(
    frames, settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]
  )


def process_video(frames: Sequence, settings: dict):
  """RGB PIL frames of one clip → (patches, (gt, gh, gw))."""
  factor = settings["patch_size"] * settings["merge_size"]
  h, w = smart_resize(
    frames[0].height, frames[0].width, factor, settings["min_pixels"], settings["max_pixels"]
  )
  arr = normalize_frames(frames, h, w, settings)
  return patchify(
    arr, settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]
  )


@dataclasses.dataclass
class Encoded:
  """One encoded scoring record (numpy, unpadded)."""

  input_ids: np.ndarray  # [T] int32
  position_ids: np.ndarray  # [3, T] int32
  pixel_values: np.ndarray  # [P, C*tp*p*p] float32 (vision items in order of appearance)
  grid_thw: np.ndarray  # [n, 3] int32
  patch_arrays: dict[str, np.ndarray]  # family per-patch arrays, first dim P
  truncated: bool = False
  vision_kinds: tuple[str, ...] = ()  # "image" / "video" per row of grid_thw

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
  for k in (
    "patch_size",
    "temporal_patch_size",
    "merge_size",
    "image_mean",
    "image_std",
    "rescale_factor",
    "min_pixels",
    "max_pixels",
  ):
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
  """Processor settings as the encoder needs them; a wrong value is a UserError naming the file it
  came
  from (a hand-edited preprocessor_config.json, say), not a traceback from deep in the resize."""

  def bad(key, what):
    raise UserError(f"{where}: field '{key}' should be {what}, got {settings[key]!r}")

  for key in _POSITIVE_INTS:
    v = settings.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      bad(key, "a positive integer")
  for key in ("image_mean", "image_std"):
    v = settings.get(key)
    if v is not None and not (
      isinstance(v, (list, tuple))
      and len(v) == 3
      and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
      )
    ):
      bad(key, "a list of 3 finite numbers")
  v = settings.get("rescale_factor")
  if v is not None and (
    isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
  ):
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


PREPROCESSOR_FILE = "preprocessor_config.json"
VIDEO_PREPROCESSOR_FILE = "video_preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"


def _processor_files(path: Path):
  """`(image settings, their file, video settings, their file)` as transformers finds them: the
  image processor's own preprocessor_config.json (video_preprocessor_config.json), else the
  `image_processor` (`video_processor`) object nested in processor_config.json, which is all that
  transformers 5 (and so LLaMA-Factory) saves. Settings not found are None."""
  image_file, video_file = path / PREPROCESSOR_FILE, path / VIDEO_PREPROCESSOR_FILE
  image = read_json_object(image_file) if image_file.is_file() else None
  video = read_json_object(video_file) if video_file.is_file() else None
  combined = path / PROCESSOR_FILE
  if (image is None or video is None) and combined.is_file():
    nested = read_json_object(combined)
    for key in ("image_processor", "video_processor"):
      if nested.get(key) is not None and not isinstance(nested[key], dict):
        raise UserError(f"{combined}: field '{key}' should be an object")
    if image is None and nested.get("image_processor") is not None:
      image, image_file = nested["image_processor"], combined
    if video is None and nested.get("video_processor") is not None:
      video, video_file = nested["video_processor"], combined
  return image, image_file, video, video_file


def written_by_llamafactory(path: Path) -> str | None:
  """Why `path` looks like a LLaMA-Factory output directory (None when it does not): the model card
  it writes (README.md tagged `llama-factory`), or the trainer's `training_args.bin` next to a
  `value_head.safetensors` (a `stage: rm` run). Our exports write neither."""
  card = path / "README.md"
  if card.is_file():
    try:
      if "llama-factory" in card.read_text(encoding="utf-8", errors="replace")[:4096]:
        return "README.md tagged llama-factory"
    except OSError:
      pass
  if (path / "training_args.bin").is_file() and (path / "value_head.safetensors").is_file():
    return "training_args.bin with value_head.safetensors"
  return None


class Processor:
  """Tokenizer + chat template + image/video settings + the family's hooks."""

  def __init__(
    self,
    tokenizer,
    family: ModuleType,
    config,
    image_settings: dict | None = None,
    video_settings: dict | None = None,
    image_preprocess: str = "transformers",
    lf_image_max_pixels: int = LF_IMAGE_MAX_PIXELS,
    lf_image_min_pixels: int = LF_IMAGE_MIN_PIXELS,
  ):
    if image_preprocess not in IMAGE_PREPROCESS:
      raise UserError(
        f"unknown image preprocessing '{image_preprocess}' (one of {', '.join(IMAGE_PREPROCESS)})"
      )
    self.tokenizer, self.family, self.config = tokenizer, family, config
    self.image_preprocess = image_preprocess
    # dtype of the collated `pixel_values`: training sets bfloat16 when it computes in bfloat16 (the
    # patch embedding casts them to that anyway; the host cast rounds the same way), which halves
    # the bytes every step copies to the device.
    self.pixel_dtype = np.dtype(np.float32)
    self.template: str | None = None
    self.lf_image_max_pixels = int(lf_image_max_pixels)
    self.lf_image_min_pixels = int(lf_image_min_pixels)
    self.image_settings = image_settings or dict(family.IMAGE_DEFAULTS)
    self.video_settings = video_settings or dict(family.VIDEO_DEFAULTS)
    if not getattr(tokenizer, "chat_template", None):
      raise UserError(
        "tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
        "chat_template.jinja)"
      )
    pad = tokenizer.pad_token_id
    if pad is None:
      pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    self.pad_id = int(pad) if pad is not None else 0

  @classmethod
  def from_pretrained(
    cls,
    path,
    family: ModuleType,
    config,
    *,
    min_pixels=None,
    max_pixels=None,
    image_preprocess: str | None = None,
    template: str | None = None,
    lf_image_max_pixels: int | None = None,
    lf_image_min_pixels: int | None = None,
  ) -> Processor:
    """`image_preprocess` None (or "auto") picks "llamafactory" for a directory LLaMA-Factory wrote
    (`written_by_llamafactory`, announced with a warning) and "transformers" otherwise."""
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

    image_cfg, image_file, video_cfg, video_file = _processor_files(path)
    if image_cfg is None:
      d = family.IMAGE_DEFAULTS
      log.warning(
        "%s: no %s, nor %s with an 'image_processor' object; using the built-in %s "
        "image settings (min_pixels=%d, max_pixels=%d)",
        path,
        PREPROCESSOR_FILE,
        PROCESSOR_FILE,
        family.MODEL_TYPE,
        d["min_pixels"],
        d["max_pixels"],
      )
    try:
      image = _checked_settings(
        _settings(family.IMAGE_DEFAULTS, image_cfg, min_pixels, max_pixels), image_file
      )
      video = _settings(
        family.VIDEO_DEFAULTS,
        {
          k: v
          for k, v in (image_cfg or {}).items()
          if k not in ("min_pixels", "max_pixels", "size")
        },
      )
      video = _checked_settings(
        _settings(video, video_cfg), video_file if video_cfg else image_file
      )
    except UserError as e:
      if not str(e).startswith("field "):
        raise
      raise UserError(f"{image_file}: {e}") from None
    lf_max = lf_image_max_pixels or LF_IMAGE_MAX_PIXELS
    lf_min = lf_image_min_pixels or LF_IMAGE_MIN_PIXELS
    if image_preprocess in (None, "auto"):
      image_preprocess = "transformers"
      if (why := written_by_llamafactory(path)) is not None:
        image_preprocess = "llamafactory"
        log.warning(
          "%s: written by LLaMA-Factory (%s), so images are preprocessed as LLaMA-Factory "
          "does (image_max_pixels=%d, image_min_pixels=%d, torchvision resize); pass "
          "--image-preprocess transformers (data.image_preprocess) for transformers' own",
          path,
          why,
          lf_max,
          lf_min,
        )
    proc = cls(tok, family, config, image, video, image_preprocess, lf_max, lf_min)
    proc.set_template(template)
    return proc

  # -- text -----------------------------------------------------------------------------------

  def _messages(self, system: str | None, parts: list, answer: str) -> list[dict]:
    content = [
      {"type": p} if p in ("image", "video") else {"type": "text", "text": p}
      for p in parts
      if p not in ("",)
    ]
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return msgs + [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]

  def set_template(self, template: str | None) -> None:
    """None / "model": the model directory's chat template; else a LLaMA-Factory template name of
    TEMPLATES, rendered as LLaMA-Factory does (an empty system means its default system)."""
    if template not in (None, "model") and template not in TEMPLATES:
      raise UserError(f"unknown chat template '{template}' (model, {', '.join(TEMPLATES)})")
    self.template = None if template == "model" else template

  def _text(self, system, parts, answer) -> str:
    if self.template is None:
      messages = self._messages(system, parts, answer)
      return self.tokenizer.apply_chat_template(messages, tokenize=False)
    default_system, think = TEMPLATES[self.template]
    system = system or default_system
    user = "".join({"image": _IMAGE_TRIO, "video": _VIDEO_TRIO}.get(p, p) for p in parts)
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    text += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if think and "<think>" not in answer and "</think>" not in answer:
      text += think  # LLaMA-Factory's ReasoningTemplate: an empty thought before every answer
    return text + f"{answer}<|im_end|>\n"

  def _render(self, system, parts, answer, grids: list[tuple[str, tuple, dict]]) -> list[int]:
    text = self._text(system, parts, answer)
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
      out.append(
        self.family.placeholder_text(
          kind, item[1], self.config, self.image_settings["merge_size"], **item[2]
        )
      )
      pos = i + len(_IMAGE_TRIO if kind == "image" else _VIDEO_TRIO)
    out.append(text[pos:])
    return self.tokenizer("".join(out), add_special_tokens=False)["input_ids"]

  # -- encode ---------------------------------------------------------------------------------

  def process_image(self, image):
    """A decoded PIL image → (patches, grid): transformers' Qwen-VL image processor (PIL
    backend), or in "llamafactory" mode what LLaMA-Factory feeds its model: `llamafactory_image`,
    then the image processor with transformers' default torchvision backend."""
    if self.image_preprocess == "llamafactory":
      image = llamafactory_image(image, self.lf_image_max_pixels, self.lf_image_min_pixels)
      return process_image(image, self.image_settings, backend="torchvision")
    return process_image(to_rgb(image), self.image_settings)

  def encode(
    self,
    record: dict,
    image_root,
    max_len: int,
    where: str = "record",
    vision: Encoded | None = None,
  ) -> Encoded:
    """A scoring record (`images`, `videos`?, `question`, `answer`, `system`?) → `Encoded`.

    `vision`: an encoding of a record with the same images and videos (a pair's other response),
    whose processed vision items are reused instead of decoding and resizing them again."""
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
        raise UserError(
          f"{where}: the question has {n_img} <image> / {n_vid} <video> placeholders but the "
          "record "
          f"has {len(images)} images / {len(videos)} videos"
        )
      parts = [{"<image>": "image", "<video>": "video"}.get(p, p) for p in pieces]
    # vision items in order of appearance
    img_iter, vid_iter = iter(images), iter(videos)
    patches, grids = [], []
    reused = None if vision is None else iter(zip(vision.vision_kinds, vision.grid_thw.tolist()))
    for p in parts:
      if p not in ("image", "video"):
        continue
      if reused is not None:
        kind, thw = next(reused, (None, None))
        if kind != p:
          raise ValueError(f"{where}: the reused vision items do not match the record's")
        x, thw = None, tuple(thw)
        frames = next(vid_iter) if p == "video" else next(img_iter)
      elif p == "image":
        name = next(img_iter)
        x, thw = self.process_image(open_image(resolve_image(name, image_root, where), where, name))
      else:
        frames = next(vid_iter)
        if isinstance(frames, str) or not frames:
          raise UserError(f"{where}: each video must be a non-empty list of frame paths")
        ims = [load_image(resolve_image(f, image_root, where), where, f) for f in frames]
        x, thw = process_video(ims, self.video_settings)
      patches.append(x)
      # frame timing matters to families that write timestamps into the text (Qwen3-VL)
      grids.append((p, thw, {"num_frames": len(frames)} if p == "video" else {}))
    ids, truncated = self._fit(system, parts, answer, grids, max_len, where)
    grid_thw = np.asarray([g for _, g, _ in grids], dtype=np.int32).reshape(-1, 3)
    ids = np.asarray(ids, dtype=np.int32)
    pos = self.family.rope_index(ids, grid_thw, self.config)
    dim = self.config.vision.patch_dim
    if vision is not None:
      pixels, arrays = vision.pixel_values, vision.patch_arrays
    else:
      pixels = (
        np.concatenate(patches, 0).astype(np.float32) if patches else np.zeros((0, dim), np.float32)
      )
      arrays = self.family.vision_patch_arrays(grid_thw, self.config)
    return Encoded(
      ids, pos.astype(np.int32), pixels, grid_thw, arrays, truncated, tuple(k for k, _, _ in grids)
    )

  def encode_pair(
    self, chosen: dict, rejected: dict, image_root, max_len: int, where: str = "record"
  ) -> pair_layout.EncodedPair:
    """A pair's two scoring records → one row of the shared-prompt layout
    (mrm_jax/models/pair_layout.py). Each sequence is encoded and cut to `max_len` exactly as
    `encode` does, so the row's two rewards are those of the two encodings; the rejected one reuses
    the chosen one's processed images when the records have the same."""
    first = self.encode(chosen, image_root, max_len, where)
    reuse = first if _vision_items(chosen) == _vision_items(rejected) else None
    second = self.encode(rejected, image_root, max_len, where, vision=reuse)
    tokens = (self.config.image_token_id, self.config.video_token_id)
    return pair_layout.pack(
      first, second, tokens, lambda grid: self.family.vision_patch_arrays(grid, self.config)
    )

  def _fit(self, system, parts, answer, grids, max_len: int, where: str):
    """Token ids within `max_len`: cut the question text (end), then the system prompt, then the
    answer's
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
    k = largest(
      lambda k: len(self._render(system, with_question(k), answer, grids)) <= max_len, total
    )
    if k >= 0:
      return self._render(system, with_question(k), answer, grids), True
    q0 = with_question(0)
    sys_text = system if system is not None else ""
    k = largest(
      lambda k: len(self._render(sys_text[:k], q0, answer, grids)) <= max_len, len(sys_text)
    )
    if k >= 0:
      return self._render(sys_text[:k], q0, answer, grids), True
    n = len(answer)
    k = largest(
      lambda k: len(self._render("", q0, answer[n - k :] if k else "", grids)) <= max_len, n
    )
    if k >= 0:
      return self._render("", q0, answer[n - k :] if k else "", grids), True
    raise UserError(f"{where}: the images/videos alone need more than max_len={max_len} tokens")

  def collate(
    self,
    examples: Sequence[Encoded],
    seq_len: int,
    patch_budget: int | None = None,
    strength: Sequence[float] | None = None,
    share: Sequence[int | None] | None = None,
    layout_sizes: dict | None = None,
  ) -> dict[str, np.ndarray]:
    return collate(
      examples,
      seq_len,
      patch_budget,
      pad_id=self.pad_id,
      merge_size=self.config.merge_size,
      patch_dim=self.config.vision.patch_dim,
      strength=strength,
      share=share,
      layout_sizes=layout_sizes,
      pixel_dtype=self.pixel_dtype,
    )

  def collate_pairs(
    self,
    pairs: Sequence[pair_layout.EncodedPair],
    seq_len: int,
    sub_len: int,
    own_len: int,
    patch_budget: int | None = None,
    strength: Sequence[float] | None = None,
    layout_sizes: dict | None = None,
  ) -> dict[str, np.ndarray]:
    """A batch of the shared-prompt layout: one row per pair (`encode_pair`) of `seq_len` tokens,
    its two sequences within `sub_len` each and the rejected response's own tokens within
    `own_len` (the arrays of mrm_jax/models/pair_layout.py)."""
    batch = self.collate(pairs, seq_len, patch_budget, strength=strength, layout_sizes=layout_sizes)
    batch.update(pair_layout.layout_arrays(pairs, seq_len, sub_len, own_len))
    return batch


def _vision_items(record: dict) -> tuple:
  """A scoring record's images and videos, comparable."""
  images = record.get("images") or []
  images = [images] if isinstance(images, str) else images
  videos = [tuple(v) if isinstance(v, list) else v for v in record.get("videos") or []]
  return tuple(images), tuple(videos)


def pair_share(rows: int) -> list[int | None]:
  """`share` of a pair batch (chosen rows 0..B-1, rejected B..2B-1): each rejected row reuses the
  vision of its chosen row, whose images it has."""
  half = rows // 2
  return [None] * half + list(range(half))


def collate(
  examples: Sequence[Encoded],
  seq_len: int,
  patch_budget: int | None = None,
  *,
  pad_id: int = 0,
  merge_size: int = 2,
  patch_dim: int | None = None,
  strength: Sequence[float] | None = None,
  share: Sequence[int | None] | None = None,
  layout_sizes: dict | None = None,
  pixel_dtype=np.float32,
) -> dict[str, np.ndarray]:
  """Static-shape batch (right padding). `patch_budget` (a multiple of merge_size**2) bounds the
  vision patches of the whole batch; None = exactly what the examples need. Each image / video frame
  gets its own vision segment id (1, 2, ...; 0 = padding patch). `share[b] = a`: row b has the
  vision items of row a (same grids), whose patches and merged tokens it reuses (`pair_share`: a
  pair's images go through the tower once). Adds the per-item attention layouts and
  `vision_token_offset`
  (mrm_jax/models/vision_layout.py; `layout_sizes` fixes their static sizes)."""
  b = len(examples)
  unit = merge_size**2
  share = list(share) if share is not None else [None] * b
  if len(share) != b:
    raise ValueError(f"share lists {len(share)} rows, the batch has {b}")
  for i, a in enumerate(share):
    if a is not None and not np.array_equal(examples[a].grid_thw, examples[i].grid_thw):
      raise ValueError(f"row {i} shares the vision of row {a} but their vision items differ")
  total = sum(e.num_patches for e, a in zip(examples, share) if a is None)
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
    "pixel_values": np.zeros((patch_budget, patch_dim), pixel_dtype),
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
    batch["input_ids"][i, : e.length] = e.input_ids
    batch["attention_mask"][i, : e.length] = 1
    batch["position_ids"][:, i, : e.length] = e.position_ids
    if share[i] is not None:
      continue
    n = e.num_patches
    batch["pixel_values"][p0 : p0 + n] = e.pixel_values
    q = p0
    for t, h, w in e.grid_thw.reshape(-1, 3):
      for _ in range(int(t)):
        seg += 1
        batch["vision_segment_ids"][q : q + h * w] = seg
        q += int(h * w)
    for name, arr in e.patch_arrays.items():
      if name.endswith("_segment_ids"):
        off = offsets.get(name, 0)
        batch[name][p0 : p0 + n] = np.where(arr > 0, arr + off, 0)
        offsets[name] = off + int(arr.max(initial=0))
      else:
        batch[name][p0 : p0 + n] = arr
    p0 += n
  if strength is not None:
    batch["strength"] = np.asarray(strength, np.float32)
  tokens = [e.num_patches // unit for e in examples]
  batch["vision_token_offset"] = vision_layout.token_offsets(tokens, share)
  return vision_layout.add_layouts(batch, layout_sizes)
