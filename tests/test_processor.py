"""Host-side processing vs transformers' Qwen2-VL processor (PIL backend) and hand-computed
layouts."""

import model_fixtures as mf
import numpy as np
import pytest
from PIL import Image

from mrm_jax.errors import UserError
from mrm_jax.models import get_family, qwen2_vl
from mrm_jax.models.processor import Processor, collate, patchify, process_image, smart_resize

FAM = get_family("qwen2_vl")


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
  d = tmp_path_factory.mktemp("proc")
  tok = mf.build_tokenizer(d)
  mf.save_preprocessor(d)
  cfg = qwen2_vl.Config.from_hf(mf.tiny_qwen2_vl_config(tok).to_dict())
  return Processor.from_pretrained(d, FAM, cfg)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  d = tmp_path_factory.mktemp("imgs")
  rng = np.random.default_rng(0)
  for name, (w, h) in {"a.png": (37, 53), "b.png": (300, 97), "c.png": (64, 64)}.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / name)
  rgba = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
  Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
  Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L").save(d / "gray.png")
  return d


def _hf_image_processor(**kw):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  return Qwen2VLImageProcessorPil(**kw)


@pytest.mark.parametrize("name", ["a.png", "b.png", "c.png", "rgba.png", "gray.png"])
@pytest.mark.parametrize("max_pixels", [28 * 28 * 16, 28 * 28 * 1280])
def test_image_preprocessing_equals_transformers_pil(images, name, max_pixels):
  from mrm_jax.models.processor import load_image

  hf = _hf_image_processor(min_pixels=56 * 56, max_pixels=max_pixels)
  ref = hf(images=[Image.open(images / name)], return_tensors="np")
  settings = dict(FAM.IMAGE_DEFAULTS, min_pixels=56 * 56, max_pixels=max_pixels)
  ours, thw = process_image(load_image(images / name), settings)
  np.testing.assert_array_equal(np.asarray(thw)[None], ref["image_grid_thw"])
  assert ours.dtype == np.float32 and ours.shape == ref["pixel_values"].shape
  np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-6, rtol=0)


def test_smart_resize_equals_transformers():
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

  for h in (28, 37, 53, 97, 300, 1000, 4000):
    for w in (29, 56, 300, 777):
      for mx in (28 * 28 * 16, 28 * 28 * 1280):
        assert smart_resize(h, w, 28, 56 * 56, mx) == ref(h, w, 28, 56 * 56, mx)


def test_video_frames_padded_by_repeating_last():
  rng = np.random.default_rng(1)
  frames = rng.normal(size=(3, 3, 56, 84)).astype(np.float32)
  patches, (t, h, w) = patchify(frames, 14, 2, 2)
  assert (t, h, w) == (2, 4, 6)
  padded, _ = patchify(np.concatenate([frames, frames[-1:]]), 14, 2, 2)
  np.testing.assert_array_equal(patches, padded)
  # first patch: channel-major [C, tp, p, p] of the top-left 14x14 block of frames 0 and 1
  np.testing.assert_array_equal(
    patches[0].reshape(3, 2, 14, 14), frames[:2, :, :14, :14].transpose(1, 0, 2, 3)
  )
  # second patch is its right neighbour (merge-block-major order: 2x2 blocks first)
  np.testing.assert_array_equal(patches[1].reshape(3, 2, 14, 14)[:, 0], frames[0, :, :14, 14:28])
  np.testing.assert_array_equal(patches[2].reshape(3, 2, 14, 14)[:, 0], frames[0, :, 14:28, :14])


def test_encode_equals_transformers_processor(proc, images):
  # Qwen2VLProcessor itself needs torchvision (its video processor); its expansion rule is replayed
  # here: each <|image_pad|> becomes grid_thw.prod() // merge_size**2 pads, then the text is
  # tokenized.
  hf = _hf_image_processor(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
  rec = {
    "images": ["a.png", "b.png"],
    "question": "Image 1: <image> Image 2: <image> Which is better?",
    "answer": "Image 2 is better.",
    "system": "You are a judge.",
  }
  text = (
    "<|im_start|>system\nYou are a judge.<|im_end|>\n<|im_start|>user\nImage 1: "
    "<|vision_start|><|image_pad|><|vision_end|> Image 2: "
    "<|vision_start|><|image_pad|><|vision_end|> "
    "Which is better?<|im_end|>\n<|im_start|>assistant\nImage 2 is better.<|im_end|>\n"
  )
  ref = hf(images=[Image.open(images / "a.png"), Image.open(images / "b.png")], return_tensors="np")
  parts = text.split("<|image_pad|>")
  text = parts[0] + "".join(
    "<|image_pad|>" * (int(g.prod()) // 4) + p for g, p in zip(ref["image_grid_thw"], parts[1:])
  )
  ref_ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
  e = proc.encode(rec, images, max_len=4096)
  np.testing.assert_array_equal(e.input_ids, ref_ids)
  np.testing.assert_allclose(e.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)
  np.testing.assert_array_equal(e.grid_thw, ref["image_grid_thw"])
  assert e.vision_kinds == ("image", "image")
  # scored token = the newline after the assistant's <|im_end|>
  assert proc.tokenizer.decode(e.input_ids[-2:]) == "<|im_end|>\n"


def test_images_go_first_without_placeholders(proc, images):
  e = proc.encode({"images": ["c.png"], "question": "Describe.", "answer": "A."}, images, 4096)
  text = proc.tokenizer.decode(e.input_ids)
  assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in text
  assert text.index("<|vision_end|>") < text.index("Describe.")
  assert int((e.input_ids == proc.config.image_token_id).sum()) == int(e.grid_thw.prod()) // 4


def test_bad_records_are_user_errors(proc, images, tmp_path):
  with pytest.raises(
    UserError, match=r"in\.jsonl:3: image '\.\./x\.png' is outside the image root"
  ):
    proc.encode(
      {"images": ["../x.png"], "question": "q", "answer": "a"}, images, 4096, "in.jsonl:3"
    )
  with pytest.raises(UserError, match=r"in\.jsonl:4: image .*missing\.png.* not found"):
    proc.encode(
      {"images": ["missing.png"], "question": "q", "answer": "a"}, images, 4096, "in.jsonl:4"
    )
  with pytest.raises(UserError, match="2 <image>"):
    proc.encode({"images": ["a.png"], "question": "<image><image>", "answer": "a"}, images, 4096)
  (images / "broken.png").write_bytes(b"not an image")
  with pytest.raises(UserError, match="cannot be decoded"):
    proc.encode({"images": ["broken.png"], "question": "q", "answer": "a"}, images, 4096)


def test_truncation_cuts_the_prompt_and_keeps_the_scored_end(proc, images):
  rec = {
    "images": ["c.png"],
    "question": "<image>" + " ".join(["Describe the picture in detail."] * 40),
    "answer": "The answer is yes.",
  }
  full = proc.encode(rec, images, 4096)
  cut = proc.encode(rec, images, full.length - 50)
  assert not full.truncated and cut.truncated
  assert full.length - 50 - 3 <= cut.length <= full.length - 50
  tail = proc.tokenizer("The answer is yes.<|im_end|>\n", add_special_tokens=False)["input_ids"]
  np.testing.assert_array_equal(cut.input_ids[-len(tail) :], tail)
  np.testing.assert_array_equal(cut.pixel_values, full.pixel_values)
  assert (cut.input_ids == proc.config.image_token_id).sum() == (
    full.input_ids == proc.config.image_token_id
  ).sum()
  # text-only: when even the question is gone, the answer's beginning is cut, never its end
  rec2 = {"question": "Hi", "answer": " ".join(["yes"] * 200)}
  short = proc.encode(rec2, images, 40)
  assert short.length <= 40 and proc.tokenizer.decode(short.input_ids[-3:]).endswith(
    "yes<|im_end|>\n"
  )
  with pytest.raises(UserError, match="max_len"):
    proc.encode({"images": ["b.png"], "question": "q", "answer": "a"}, images, 8)


def test_collate_static_shapes_and_segments(proc, images, tmp_path):
  rng = np.random.default_rng(2)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (44, 60, 3), dtype=np.uint8)).save(images / f"f{i}.png")
  vid = proc.encode(
    {"videos": [["f0.png", "f1.png", "f2.png"]], "question": "<video>What?", "answer": "x"},
    images,
    4096,
  )
  img = proc.encode({"images": ["a.png"], "question": "q", "answer": "y"}, images, 4096)
  txt = proc.encode({"question": "q", "answer": "z"}, images, 4096)
  assert (
    vid.vision_kinds == ("video",) and vid.grid_thw[0, 0] == 2
  )  # 3 frames padded to 4 = 2 temporal patches
  n_vid, n_img = vid.num_patches, img.num_patches
  budget = n_vid + n_img + 8
  b = proc.collate(
    [vid, txt, img],
    seq_len=max(vid.length, img.length) + 2,
    patch_budget=budget,
    strength=[1, 2, 3],
  )
  assert (
    b["input_ids"].shape == (3, vid.length + 2)
    or b["input_ids"].shape[1] == max(vid.length, img.length) + 2
  )
  assert b["position_ids"].shape == (3, 3, b["input_ids"].shape[1])
  assert b["pixel_values"].shape == (budget, 3 * 2 * 14 * 14)
  np.testing.assert_array_equal(b["attention_mask"].sum(1), [vid.length, txt.length, img.length])
  assert (b["input_ids"][1, txt.length :] == proc.pad_id).all()
  seg = b["vision_segment_ids"]
  hw = int(vid.grid_thw[0, 1] * vid.grid_thw[0, 2])
  np.testing.assert_array_equal(seg[:hw], 1)
  np.testing.assert_array_equal(seg[hw : 2 * hw], 2)  # each video frame-pair is its own segment
  np.testing.assert_array_equal(seg[2 * hw : n_vid + n_img], 3)
  np.testing.assert_array_equal(seg[n_vid + n_img :], 0)  # padding
  np.testing.assert_array_equal(b["pixel_values"][n_vid : n_vid + n_img], img.pixel_values)
  np.testing.assert_array_equal(
    b["vision_pos_ids"][:n_vid], qwen2_vl.vision_position_ids(vid.grid_thw, 2)
  )
  np.testing.assert_array_equal(b["strength"], [1, 2, 3])
  with pytest.raises(ValueError, match="patch_budget"):
    collate([vid], seq_len=vid.length, patch_budget=4, merge_size=2)


@pytest.mark.parametrize(
  "name,content,message",
  [
    (
      "preprocessor_config.json",
      '{"max_pixels": "big"}',
      "preprocessor_config.json: field 'max_pixels'",
    ),
    ("preprocessor_config.json", '{"size": [1, 2]}', "preprocessor_config.json: field 'size'"),
    (
      "preprocessor_config.json",
      '{"image_mean": [0.5, NaN, 0.5]}',
      "preprocessor_config.json: NaN is not a JSON number",
    ),
    (
      "preprocessor_config.json",
      '{"patch_size": 14,',
      "preprocessor_config.json:1: malformed JSON",
    ),
    (
      "video_preprocessor_config.json",
      '{"merge_size": 0}',
      "video_preprocessor_config.json: field 'merge_size'",
    ),
    ("chat_template.json", '{"chat_template": 3}', "chat_template.json: field 'chat_template'"),
  ],
)
def test_broken_processor_files_name_the_file(tmp_path, name, content, message):
  tok = mf.build_tokenizer(tmp_path)
  mf.save_preprocessor(tmp_path)
  cfg = qwen2_vl.Config.from_hf(mf.tiny_qwen2_vl_config(tok).to_dict())
  if name == "chat_template.json":  # only read when the tokenizer carries no template of its own
    import json

    tc = tmp_path / "tokenizer_config.json"
    tc.write_text(
      json.dumps({k: v for k, v in json.loads(tc.read_text()).items() if k != "chat_template"})
    )
    for f in ("chat_template.jinja",):
      (tmp_path / f).unlink(missing_ok=True)
  (tmp_path / name).write_text(content)
  with pytest.raises(UserError, match=message.replace("(", r"\(")):
    Processor.from_pretrained(tmp_path, FAM, cfg)


# -- LLaMA-Factory interop -------------------------------------------------------------------------


def _tiny_dir(d, image_processor: dict | None, combined: bool):
  """A tiny Qwen2-VL processor directory whose image settings live in preprocessor_config.json
  (`combined=False`) or, as transformers 5 / LLaMA-Factory save them, nested in
  processor_config.json."""
  import json

  tok = mf.build_tokenizer(d)
  cfg = qwen2_vl.Config.from_hf(mf.tiny_qwen2_vl_config(tok).to_dict())
  if image_processor is not None:
    if combined:
      (d / "processor_config.json").write_text(
        json.dumps(
          {
            "image_processor": image_processor,
            "video_processor": dict(
              image_processor, size={"shortest_edge": 784, "longest_edge": 5000}
            ),
            "processor_class": "Qwen2VLProcessor",
          }
        )
      )
    else:
      (d / "preprocessor_config.json").write_text(json.dumps(image_processor))
  return cfg


def test_processor_config_json_nested_settings_are_read(tmp_path, caplog):
  settings = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "size": {"shortest_edge": 784, "longest_edge": 4096},
  }
  cfg = _tiny_dir(tmp_path, settings, combined=True)
  p = Processor.from_pretrained(tmp_path, FAM, cfg)
  assert (p.image_settings["min_pixels"], p.image_settings["max_pixels"]) == (784, 4096)
  assert p.video_settings["max_pixels"] == 5000
  # preprocessor_config.json, when present, wins (transformers reads it first)
  (tmp_path / "preprocessor_config.json").write_text(
    '{"size": {"shortest_edge": 3136, "longest_edge": 9000}}'
  )
  assert Processor.from_pretrained(tmp_path, FAM, cfg).image_settings["max_pixels"] == 9000
  (tmp_path / "preprocessor_config.json").unlink()
  (tmp_path / "processor_config.json").write_text('{"image_processor": {"max_pixels": "big"}}')
  with pytest.raises(UserError, match="processor_config.json: field 'max_pixels'"):
    Processor.from_pretrained(tmp_path, FAM, cfg)
  (tmp_path / "processor_config.json").write_text('{"image_processor": [1]}')
  with pytest.raises(
    UserError, match="processor_config.json: field 'image_processor' should be an object"
  ):
    Processor.from_pretrained(tmp_path, FAM, cfg)


def test_missing_processor_settings_warn_naming_the_files(tmp_path, caplog):
  cfg = _tiny_dir(tmp_path, None, combined=False)
  with caplog.at_level("WARNING"):
    p = Processor.from_pretrained(tmp_path, FAM, cfg)
  assert p.image_settings["max_pixels"] == FAM.IMAGE_DEFAULTS["max_pixels"]
  assert (
    "no preprocessor_config.json, nor processor_config.json" in caplog.text
    and str(tmp_path) in caplog.text
  )


@pytest.mark.parametrize(
  "size,mode,after",
  [
    (
      (1024, 768),
      "RGB",
      (886, 665),
    ),  # above 768*768: shrunk by sqrt(589824 / 786432), sides truncated
    ((200, 20), "RGB", (200, 28)),  # above 32*32 but a side under 28 px: that side stretched to 28
    ((20, 20), "RGB", (32, 32)),  # under 32*32: enlarged to 32*32
    ((30, 40), "RGBA", (30, 40)),  # alpha dropped by convert("RGB"), not composited on white
  ],
)
def test_llamafactory_image_regularisation_hand_checked(size, mode, after):
  from mrm_jax.models.processor import llamafactory_image

  rng = np.random.default_rng(1)
  arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
  im = llamafactory_image(Image.fromarray(arr, mode))
  assert im.mode == "RGB" and im.size == after
  if mode == "RGBA":
    np.testing.assert_array_equal(np.asarray(im), arr[..., :3])


def test_llamafactory_mode_grids(tmp_path):
  """1024x768 gets LLaMA-Factory's 48x64 patch grid (886x665 → smart_resize 672x896), which no
  --max-pixels can give in transformers mode (46x62 at 768*768)."""
  from mrm_jax.models.processor import llamafactory_image, open_image

  settings = dict(FAM.IMAGE_DEFAULTS)
  rng = np.random.default_rng(2)
  Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(tmp_path / "big.png")
  im = open_image(tmp_path / "big.png")
  _, thw = process_image(llamafactory_image(im), settings, backend="torchvision")
  assert tuple(thw) == (1, 48, 64)
  _, thw = process_image(im.convert("RGB"), dict(settings, max_pixels=768 * 768))
  assert tuple(thw) == (1, 46, 62)
  for size, grid in (((200, 20), (2, 14)), ((20, 20), (4, 4))):
    _, thw = process_image(
      llamafactory_image(Image.new("RGB", size)), dict(settings), backend="torchvision"
    )
    assert tuple(thw) == (1,) + grid


@pytest.mark.parametrize(
  "src,dst",
  [
    ((886, 665), (896, 672)),
    ((200, 28), (196, 28)),
    ((32, 32), (56, 56)),
    ((3000, 2000), (1232, 812)),
  ],
)
def test_fixed_point_bicubic_equals_pil_and_torchvision(src, dst):
  """The numpy resize is PIL's bicubic bit for bit at PIL's precision, and torch's uint8 CPU kernel
  (transformers' torchvision backend) at torch's, checked when torchvision is installed."""
  from mrm_jax.models.processor import resize_bicubic_uint8

  rng = np.random.default_rng(3)
  arr = rng.integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)
  pil = np.asarray(Image.fromarray(arr).resize(dst, Image.BICUBIC))
  np.testing.assert_array_equal(resize_bicubic_uint8(arr, dst[1], dst[0], precision=22), pil)
  try:
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F
  except ImportError:
    return
  tv = (
    F.resize(
      torch.from_numpy(arr).permute(2, 0, 1).contiguous(),
      [dst[1], dst[0]],
      interpolation=InterpolationMode.BICUBIC,
      antialias=True,
    )
    .permute(1, 2, 0)
    .numpy()
  )
  np.testing.assert_array_equal(resize_bicubic_uint8(arr, dst[1], dst[0]), tv)


def test_llamafactory_output_directory_is_detected(tmp_path, caplog):
  cfg = _tiny_dir(tmp_path, {"patch_size": 14}, combined=True)
  assert Processor.from_pretrained(tmp_path, FAM, cfg).image_preprocess == "transformers"
  (tmp_path / "README.md").write_text("---\ntags:\n- llama-factory\n- full\n---\n")
  with caplog.at_level("WARNING"):
    p = Processor.from_pretrained(tmp_path, FAM, cfg)
  assert p.image_preprocess == "llamafactory" and "written by LLaMA-Factory" in caplog.text
  assert (
    Processor.from_pretrained(tmp_path, FAM, cfg, image_preprocess="transformers").image_preprocess
    == "transformers"
  )
  with pytest.raises(UserError, match="unknown image preprocessing 'x'"):
    Processor.from_pretrained(tmp_path, FAM, cfg, image_preprocess="x")


def test_llamafactory_templates(proc):
  """qwen3_vl (Thinking) puts an empty thought before the answer; qwen2_vl has a default system;
  an empty system is LLaMA-Factory's "none"."""
  parts = ["image", "What?"]
  trio = "<|vision_start|><|image_pad|><|vision_end|>"
  try:
    proc.set_template("qwen3_vl")
    assert proc._text("", parts, "Red.") == (
      f"<|im_start|>user\n{trio}What?<|im_end|>\n<|im_start|>assistant\n"
      "<think>\n\n</think>\n\nRed.<|im_end|>\n"
    )
    assert proc._text(None, parts, "<think>x</think>Red.").endswith(
      "assistant\n<think>x</think>Red.<|im_end|>\n"
    )
    proc.set_template("qwen3_vl_nothink")
    assert proc._text("S", parts, "Red.").startswith(
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user"
    )
    proc.set_template("qwen2_vl")
    model_text = None
    proc.set_template("model")
    model_text = proc._text(None, parts, "Red.")
    proc.set_template("qwen2_vl")
    assert (
      proc._text("", parts, "Red.") == model_text
    )  # the Qwen2-VL template renders the same text
    with pytest.raises(UserError, match="unknown chat template 'nope'"):
      proc.set_template("nope")
  finally:
    proc.set_template(None)
