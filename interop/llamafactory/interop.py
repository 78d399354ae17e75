"""LLaMA-Factory <-> mrm-jax reward agreement, end to end (driven by run_interop.sh).

Runs with the LLaMA-Factory virtualenv's python; calls `mrm-jax` (another environment) as a
command. Per family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and LLaMA-Factory template:

1. a tiny random transformers model (tokenizer, processor_config.json, float32 weights);
2. a pair dataset: canonical pairs in WORK/data/src (images in src/images: plain, larger than
   LLaMA-Factory's image_max_pixels, RGBA, greyscale, thin, tiny), converted with
   `mrm-jax convert --format llamafactory` into WORK/data (so image paths are rebased), one file
   without any system and one with systems, plus the README's dataset_info.json entries;
3. 2 `stage: rm` training steps with `llamafactory-cli train`;
4. rewards of every record (chosen and rejected answer of each pair) from
   (a) LLaMA-Factory: its argument parser, get_dataset(stage="rm"), load_model(add_valuehead=True),
       its pairwise collator and PairwiseTrainer.compute_loss (value head at the last non-pad
       token), on its output directory;
   (b) `mrm-jax score` on that directory (--image-preprocess auto, which must pick llamafactory,
       and --template the LLaMA-Factory template);
   (c) LLaMA-Factory as in (a) on `mrm-jax export` of that directory (no missing or unexpected
       key may be reported, the value head must be found);
5. the max |difference| per record kind; exit status 1 if a bound is exceeded or a check fails.

Subcommands `lf-score` and `build-model` run in child processes (one model load each).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# family -> LLaMA-Factory templates to train and score with
RUNS = [
  ("qwen2_vl", "qwen2_vl"),
  ("qwen2_5_vl", "qwen2_vl"),
  ("qwen3_vl", "qwen3_vl_nothink"),
  ("qwen3_vl", "qwen3_vl"),
]
TOL = {"plain": 1e-4, "resized": 1e-3}
SPECIAL = [
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|vision_start|>",
  "<|vision_end|>",
  "<|image_pad|>",
  "<|video_pad|>",
]
# image processor settings per family; Qwen2.5-VL gets custom pixel limits, so that the
# processor resizes again after LLaMA-Factory's own regularisation
PROCESSOR = {
  "qwen2_vl": dict(
    patch_size=14,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 1280,
    mean=[0.48145466, 0.4578275, 0.40821073],
    std=[0.26862954, 0.26130258, 0.27577711],
  ),
  "qwen2_5_vl": dict(
    patch_size=14,
    min_pixels=28 * 28 * 4,
    max_pixels=28 * 28 * 256,
    mean=[0.48145466, 0.4578275, 0.40821073],
    std=[0.26862954, 0.26130258, 0.27577711],
  ),
  "qwen3_vl": dict(
    patch_size=16, min_pixels=65536, max_pixels=16777216, mean=[0.5] * 3, std=[0.5] * 3
  ),
}


def log(msg):
  print(msg, flush=True)


# ------------------------------------------------------------------------------------------
# tiny models


def build_tokenizer(out_dir, extra_tokens=()):
  """A byte-level BPE with the Qwen special tokens (see tests/model_fixtures.py)."""
  sys.path.insert(0, str(ROOT / "tests"))
  from model_fixtures import _CORPUS, QWEN2_VL_CHAT_TEMPLATE
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400 - len(SPECIAL),
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(_CORPUS * 4, trainer)
  tok.add_special_tokens(SPECIAL)
  if extra_tokens:  # Qwen3's <think> / </think>: added, not special
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
  )
  fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
  return fast, QWEN2_VL_CHAT_TEMPLATE


def build_model(family: str, out_dir: Path, seed: int = 0):
  import torch
  import transformers

  sys.path.insert(0, str(ROOT / "tests"))
  from model_fixtures import randomize_

  tok, chat_template = build_tokenizer(
    out_dir, ("<think>", "</think>") if family == "qwen3_vl" else ()
  )
  ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
  text = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=8192,
    bos_token_id=None,
    eos_token_id=ids["<|im_end|>"],
    pad_token_id=ids["<|endoftext|>"],
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
  )
  tokens = dict(
    image_token_id=ids["<|image_pad|>"],
    video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"],
    vision_end_token_id=ids["<|vision_end|>"],
    tie_word_embeddings=False,
  )
  if family == "qwen2_vl":
    vision = dict(
      depth=2,
      embed_dim=32,
      hidden_size=64,
      num_heads=2,
      patch_size=14,
      spatial_merge_size=2,
      temporal_patch_size=2,
    )
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
  elif family == "qwen2_5_vl":
    vision = dict(
      depth=4,
      hidden_size=32,
      intermediate_size=64,
      num_heads=2,
      out_hidden_size=64,
      patch_size=14,
      spatial_merge_size=2,
      temporal_patch_size=2,
      window_size=56,
      fullatt_block_indexes=[1, 3],
      tokens_per_second=2,
    )
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
  else:
    text = dict(
      text,
      head_dim=16,
      attention_bias=False,
      rope_parameters=dict(text["rope_parameters"], mrope_interleaved=True),
    )
    vision = dict(
      depth=3,
      hidden_size=32,
      intermediate_size=64,
      num_heads=2,
      out_hidden_size=64,
      patch_size=16,
      spatial_merge_size=2,
      temporal_patch_size=2,
      num_position_embeddings=64,
      deepstack_visual_indexes=[0, 1],
    )
    cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
  torch.manual_seed(seed)
  model = transformers.AutoModelForImageTextToText.from_config(cfg).eval()
  randomize_(model, seed)
  model.save_pretrained(str(out_dir))

  p = PROCESSOR[family]
  size = {"shortest_edge": p["min_pixels"], "longest_edge": p["max_pixels"]}
  common = dict(
    patch_size=p["patch_size"],
    temporal_patch_size=2,
    merge_size=2,
    size=size,
    image_mean=p["mean"],
    image_std=p["std"],
  )
  image_processor = transformers.Qwen2VLImageProcessor(**common)
  if family == "qwen3_vl":
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    video_processor = Qwen3VLVideoProcessor(**common)
    processor_cls = transformers.Qwen3VLProcessor
  else:
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    video_processor = Qwen2VLVideoProcessor(**common)
    processor_cls = (
      transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
    )
  processor = processor_cls(
    image_processor=image_processor,
    tokenizer=tok,
    video_processor=video_processor,
    chat_template=chat_template,
  )
  processor.save_pretrained(str(out_dir))


# ------------------------------------------------------------------------------------------
# dataset


def image_set(rng):
  """(name, kind, PIL image): kind 'plain' needs no resizing anywhere (both sides multiples of
  28 and 32, within every family's pixel limits), 'resized' does, or is RGBA / greyscale."""
  from PIL import Image

  def rgb(w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

  return [
    ("plain_448x224", "plain", rgb(448, 224)),
    ("plain_224x448", "plain", rgb(224, 448)),
    ("large_1024x768", "resized", rgb(1024, 768)),
    ("large_1500x1000", "resized", rgb(1500, 1000)),
    ("rgba_300x200", "resized", Image.fromarray(rng.integers(0, 256, (200, 300, 4), np.uint8))),
    ("grey_640x480", "resized", Image.fromarray(rng.integers(0, 256, (480, 640), np.uint8))),
    ("thin_200x20", "resized", rgb(200, 20)),
    ("thin_24x300", "resized", rgb(24, 300)),
    ("tiny_20x20", "resized", rgb(20, 20)),
    ("odd_333x251", "resized", rgb(333, 251)),
  ]


def write_dataset(data: Path, mrm_jax: list[str]) -> list[dict]:
  """Canonical pairs in data/src, converted into data by `mrm-jax convert`. Returns the expected
  records in LLaMA-Factory's reading order: {id, kind, n_images}."""
  src = data / "src"
  (src / "images").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  kinds = {}
  for name, kind, im in image_set(rng):
    im.save(src / "images" / f"{name}.png")
    kinds[name] = kind
  answers = [
    "A red circle on a blue background.",
    "The cat sits on the mat.",
    "No, the object is a green square near the top left corner.",
    "The answer is yes.",
  ]

  def pair(pid, images, question, i, **extra):
    kind = "resized" if any(kinds[n] == "resized" for n in images) else "plain"
    rec = dict(
      id=pid,
      images=[f"images/{n}.png" for n in images],
      question=question,
      chosen=answers[i % 4],
      rejected=answers[(i + 1) % 4],
      **extra,
    )
    return rec, dict(id=pid, kind=kind, n_images=len(images))

  nosys, sys_, expected = [], [], []
  i = 0
  # no system anywhere in this file
  for images, question in [
    ([], "Which image is better? Describe the picture in detail."),
    (["plain_448x224"], "<image>What is in the image?"),
    (["plain_224x448"], "What is in the image? Describe the picture in detail."),
    (["plain_448x224", "plain_224x448"], "Image 1 <image> Image 2 <image> Which is better?"),
    (["large_1024x768"], "<image>What is in the image?"),
    (["large_1500x1000"], "Describe the picture in detail."),
    (["rgba_300x200"], "<image>What is in the image?"),
    (["grey_640x480"], "<image>Describe the picture in detail."),
    (["thin_200x20"], "<image>What is in the image?"),
    (["thin_24x300"], "<image>What is in the image?"),
    (["tiny_20x20"], "<image>What is in the image?"),
    (["odd_333x251", "rgba_300x200"], "<image><image>Which image is better?"),
  ]:
    extra = {"strength": 0.75, "source": "interop"} if i % 3 == 0 else {}
    if i % 4 == 1:
      extra["meta"] = {"note": f"pair {i}", "nested": {"k": [1, 2]}}
    rec, exp = pair(f"nosys-{i:02d}", images, question, i, **extra)
    nosys.append(rec)
    expected.append(exp)
    i += 1
  # systems
  for images, question, system in [
    ([], "Which image is better?", "You are a careful judge."),
    (["plain_448x224"], "<image>What is in the image?", "Rate the answer."),
    (["large_1024x768"], "<image>Describe the picture in detail.", "You are a careful judge."),
  ]:
    rec, exp = pair(f"sys-{i:02d}", images, question, i, system=system)
    sys_.append(rec)
    expected.append(exp)
    i += 1
  for name, recs in (("pairs_nosys", nosys), ("pairs_sys", sys_)):
    (src / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run(
      mrm_jax
      + [
        "convert",
        "--input",
        str(src / f"{name}.jsonl"),
        "--from",
        "canonical",
        "--output",
        str(data / f"{name}.jsonl"),
        "--format",
        "llamafactory",
      ]
    )
  columns = {
    "messages": "conversations",
    "chosen": "chosen",
    "rejected": "rejected",
    "images": "images",
    "system": "system",
  }
  info = {
    f"mrm_{name}": {
      "file_name": f"{name}.jsonl",
      "formatting": "sharegpt",
      "ranking": True,
      "columns": columns,
    }
    for name in ("pairs_nosys", "pairs_sys")
  }
  (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
  # checks on what convert wrote: rebased paths, system always present, side column
  for name in ("pairs_nosys", "pairs_sys"):
    for line in (data / f"{name}.jsonl").read_text().splitlines():
      rec = json.loads(line)
      assert "system" in rec, rec
      for p in rec["images"]:
        assert p.startswith("src/images/") and (data / p).is_file(), p
  # scoring records for mrm-jax score: each pair's chosen, then rejected answer, beside the files
  score = []
  for name in ("pairs_nosys", "pairs_sys"):
    for line in (data / f"{name}.jsonl").read_text().splitlines():
      rec = json.loads(line)
      for side in ("chosen", "rejected"):
        score.append(
          dict(
            id=f"{rec['id']}/{side}",
            images=rec["images"],
            question=rec["conversations"][0]["value"],
            answer=rec[side]["value"],
            system=rec["system"],
          )
        )
  (data / "score_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in score))
  return expected


# ------------------------------------------------------------------------------------------
# LLaMA-Factory scoring (child process)


def lf_score(model_dir, template, data_dir, out):
  import torch
  from llamafactory.data import PairwiseDataCollatorWithPadding as Collator
  from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
  from llamafactory.hparams import get_train_args
  from llamafactory.model import load_model, load_tokenizer
  from llamafactory.model.model_utils.valuehead import load_valuehead_params
  from llamafactory.train.rm.trainer import PairwiseTrainer

  args = dict(
    stage="rm",
    model_name_or_path=str(model_dir),
    template=template,
    dataset_dir=str(data_dir),
    eval_dataset="mrm_pairs_nosys,mrm_pairs_sys",
    do_train=False,
    do_predict=True,
    finetuning_type="full",
    cutoff_len=4096,
    output_dir=str(Path(out).parent / "lf_score_tmp"),
    per_device_eval_batch_size=2,
    report_to="none",
    overwrite_cache=True,
    dataloader_num_workers=0,
  )
  model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
  tokenizer_module = load_tokenizer(model_args)
  tokenizer = tokenizer_module["tokenizer"]
  template_obj = get_template_and_fix_tokenizer(tokenizer, data_args)
  dataset_module = get_dataset(
    template_obj, model_args, data_args, training_args, stage="rm", **tokenizer_module
  )
  dataset = dataset_module["eval_dataset"]
  if load_valuehead_params(str(model_dir), model_args) is None:
    raise SystemExit(f"LLaMA-Factory found no value head in {model_dir}")
  model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False, add_valuehead=True)
  model.eval()
  collator = Collator(template=template_obj, model=model, pad_to_multiple_of=8, **tokenizer_module)
  trainer = PairwiseTrainer(
    model=model,
    args=training_args,
    finetuning_args=finetuning_args,
    data_collator=collator,
    **dataset_module,
    **tokenizer_module,
  )
  vision_start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
  rows = [
    dict(
      n_images=len(r["images"] or []),
      n_vision_groups=int(np.sum(np.asarray(r["chosen_input_ids"]) == vision_start)),
    )
    for r in dataset
  ]
  chosen, rejected = [], []
  with torch.no_grad():
    for batch in trainer.get_eval_dataloader(dataset):
      _, (_, c, r) = trainer.compute_loss(model, batch, return_outputs=True)
      chosen += c.reshape(-1).float().tolist()
      rejected += r.reshape(-1).float().tolist()
  Path(out).write_text(json.dumps(dict(chosen=chosen, rejected=rejected, rows=rows)))


# ------------------------------------------------------------------------------------------
# driver


def run(cmd, env=None, check=True, capture=False):
  log("$ " + " ".join(str(c) for c in cmd))
  proc = subprocess.run(
    [str(c) for c in cmd],
    env=env,
    text=True,
    stdout=subprocess.PIPE if capture else None,
    stderr=subprocess.STDOUT if capture else None,
  )
  if check and proc.returncode != 0:
    if capture:
      sys.stdout.write(proc.stdout[-8000:])
    raise SystemExit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}")
  return proc


LOAD_PROBLEM = re.compile(r"MISSING|UNEXPECTED|newly initialized|were not used|MISMATCH")


def lf_score_child(model_dir, template, data_dir, out, env):
  proc = run(
    [sys.executable, __file__, "lf-score", model_dir, template, data_dir, out],
    env=env,
    capture=True,
  )
  problems = [ln for ln in proc.stdout.splitlines() if LOAD_PROBLEM.search(ln)]
  return json.loads(Path(out).read_text()), problems


def load_report_control(exp, template, data, work, env):
  """The missing-key check must see something: our export without lm_head.weight is reported."""
  import shutil

  from safetensors.numpy import load_file, save_file

  bad = work / "control-no-lm-head"
  shutil.rmtree(bad, ignore_errors=True)
  shutil.copytree(exp, bad)
  for f in bad.glob("model*.safetensors"):
    tensors = load_file(str(f))
    save_file(
      {k: v for k, v in tensors.items() if k != "lm_head.weight"}, str(f), metadata={"format": "pt"}
    )
  _, problems = lf_score_child(bad, template, data, work / "lf-rewards-control.json", env)
  log(f"control (lm_head.weight removed): LLaMA-Factory's load report: {problems[:2]}")
  return [] if problems else ["control: a checkpoint without lm_head.weight went unreported"]


def train_lf(base, template, data, out, env):
  cfg = dict(
    model_name_or_path=str(base),
    stage="rm",
    do_train=True,
    finetuning_type="full",
    dataset="mrm_pairs_nosys,mrm_pairs_sys",
    dataset_dir=str(data),
    template=template,
    cutoff_len=4096,
    overwrite_cache=True,
    output_dir=str(out),
    overwrite_output_dir=True,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=1,
    max_steps=2,
    learning_rate=1.0e-3,
    lr_scheduler_type="constant",
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    dataloader_num_workers=0,
    seed=0,
  )
  path = out.parent / f"{out.name}.yaml"
  path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
  cli = Path(sys.executable).parent / "llamafactory-cli"
  proc = run([cli, "train", path], env=env, capture=True)
  (out.parent / f"{out.name}.train.log").write_text(proc.stdout)
  assert (out / "value_head.safetensors").is_file(), f"LLaMA-Factory left no value head in {out}"


def mrm_score(mrm_jax, model_dir, template, data, out, env, extra=()):
  proc = run(
    mrm_jax
    + [
      "score",
      "--model",
      model_dir,
      "--input",
      data / "score_records.jsonl",
      "--output",
      out,
      "--template",
      template,
      "--no-resume",
      *extra,
    ],
    env=env,
    capture=True,
  )
  picked = "preprocessed as LLaMA-Factory does" in proc.stdout
  scores = [json.loads(ln)["score"] for ln in Path(out).read_text().splitlines()]
  return np.asarray(scores, np.float64), picked, proc.stdout


def interleave(lf):
  """LLaMA-Factory's (chosen, rejected) lists -> our record order (pair by pair)."""
  return np.asarray([x for c, r in zip(lf["chosen"], lf["rejected"]) for x in (c, r)], np.float64)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, type=Path)
  ap.add_argument("--mrm-jax", default="mrm-jax", help="the mrm-jax command (may hold spaces)")
  ap.add_argument("--only", default="", help="comma-separated family:template subset")
  args = ap.parse_args(argv)
  work = args.workdir.resolve()
  work.mkdir(parents=True, exist_ok=True)
  mrm_jax = args.mrm_jax.split()
  env = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    WANDB_DISABLED="true",
    HF_DATASETS_CACHE=str(work / "hf_datasets_cache"),
    TOKENIZERS_PARALLELISM="false",
  )
  data = work / "data"
  expected = write_dataset(data, mrm_jax)
  kinds = np.asarray([e["kind"] for e in expected for _ in (0, 1)])
  runs = [r for r in RUNS if not args.only or f"{r[0]}:{r[1]}" in args.only.split(",")]
  results, failures = [], []
  for family, template in runs:
    tag = f"{family}-{template}"
    log(f"\n=== {family} / LLaMA-Factory template {template}")
    base, out, exp = work / f"base-{family}", work / f"lf-{tag}", work / f"export-{tag}"
    if not (base / "config.json").is_file():
      run([sys.executable, __file__, "build-model", family, base], env=env)
    train_lf(base, template, data, out, env)
    lf, lf_problems = lf_score_child(out, template, data, work / f"lf-rewards-{tag}.json", env)
    # LLaMA-Factory read every record, each with its images
    if len(lf["rows"]) != len(expected):
      failures.append(f"{tag}: LLaMA-Factory read {len(lf['rows'])} of {len(expected)} pairs")
    for e, row in zip(expected, lf["rows"]):
      if not row["n_images"] == row["n_vision_groups"] == e["n_images"]:
        failures.append(f"{tag}: {e['id']}: LLaMA-Factory saw {row} images, want {e['n_images']}")
    ours, picked, _ = mrm_score(mrm_jax, out, template, data, work / f"mrm-scores-{tag}.jsonl", env)
    if not picked:
      failures.append(f"{tag}: mrm-jax score did not announce llamafactory preprocessing")
    run(mrm_jax + ["export", "--checkpoint", out, "--output", exp], env=env)
    lf_exp, exp_problems = lf_score_child(
      exp, template, data, work / f"lf-rewards-export-{tag}.json", env
    )
    if exp_problems:
      failures.append(f"{tag}: LLaMA-Factory loading our export reported: {exp_problems[:3]}")
    if not results:
      failures += load_report_control(exp, template, data, work, env)
    a, c = interleave(lf), interleave(lf_exp)
    row = dict(
      family=family,
      template=template,
      lf_load_problems=len(lf_problems),
      export_load_problems=len(exp_problems),
    )
    for kind in ("plain", "resized"):
      m = kinds == kind
      row[f"ours_{kind}"] = float(np.max(np.abs(ours[m] - a[m])))
      row[f"export_{kind}"] = float(np.max(np.abs(c[m] - a[m])))
      row[f"export_vs_ours_{kind}"] = float(np.max(np.abs(c[m] - ours[m])))
      for key in ("ours", "export"):
        if not row[f"{key}_{kind}"] <= TOL[kind]:
          failures.append(
            f"{tag}: {key} vs LLaMA-Factory on {kind} records: "
            f"{row[f'{key}_{kind}']:.3g} > {TOL[kind]:g}"
          )
    # controls: the resized records do exercise LLaMA-Factory's preprocessing (transformers'
    # own differs there, not on plain records), and the template matters
    other, _, _ = mrm_score(
      mrm_jax,
      out,
      template,
      data,
      work / f"mrm-scores-tf-{tag}.jsonl",
      env,
      ["--image-preprocess", "transformers"],
    )
    row["control_transformers_preprocess"] = [
      float(np.max(np.abs(other[m] - a[m]))) for m in (kinds == "plain", kinds == "resized")
    ]
    if not (
      row["control_transformers_preprocess"][0] <= TOL["plain"]
      and row["control_transformers_preprocess"][1] > TOL["resized"]
    ):
      failures.append(
        f"{tag}: --image-preprocess transformers control: {row['control_transformers_preprocess']}"
      )
    if template.startswith("qwen3_vl"):
      wrong = "qwen3_vl" if template == "qwen3_vl_nothink" else "qwen3_vl_nothink"
      other, _, _ = mrm_score(
        mrm_jax, out, wrong, data, work / f"mrm-scores-{wrong}-{tag}.jsonl", env
      )
      row[f"control_template_{wrong}"] = float(np.max(np.abs(other - a)))
      if not row[f"control_template_{wrong}"] > TOL["resized"]:
        failures.append(f"{tag}: scoring with --template {wrong} changed nothing")
    row["reward_range"] = [float(a.min()), float(a.max())]
    log(json.dumps(row))
    results.append(row)
  report(results, failures, work)
  return 1 if failures else 0


def report(results, failures, work):
  import llamafactory
  import torch
  import torchvision
  import transformers

  versions = (
    f"LLaMA-Factory {llamafactory.__version__}, transformers {transformers.__version__}, "
    f"torch {torch.__version__}, torchvision {torchvision.__version__}"
  )
  log(
    f"\n{datetime.date.today().isoformat()}; {versions}; "
    f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
  )
  log("max |reward difference| vs LLaMA-Factory on its own output directory (plain / resized):")
  log(
    f"{'family':11s} {'LF template':17s} {'mrm-jax score':>23s} {'LF on mrm-jax export':>23s}"
    f"   controls: {'transformers preprocess':>23s} {'other template':>14s}"
  )
  for r in results:
    tf = r["control_transformers_preprocess"]
    wrong = next((v for k, v in r.items() if k.startswith("control_template_")), None)
    log(
      f"{r['family']:11s} {r['template']:17s} {r['ours_plain']:11.2e} {r['ours_resized']:11.2e} "
      f"{r['export_plain']:11.2e} {r['export_resized']:11.2e}             "
      f"{tf[0]:11.2e} {tf[1]:11.2e} {'-' if wrong is None else f'{wrong:.2e}':>14s}"
    )
  (work / "interop_results.json").write_text(
    json.dumps(dict(versions=versions, results=results, failures=failures), indent=2)
  )
  if failures:
    log("\nFAILED:\n  " + "\n  ".join(failures))
  else:
    log(f"\nall within bounds (plain {TOL['plain']:g}, resized / RGBA / thin {TOL['resized']:g})")


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "lf-score":
    lf_score(*sys.argv[2:6])
  elif len(sys.argv) > 1 and sys.argv[1] == "build-model":
    build_model(sys.argv[2], Path(sys.argv[3]))
  else:
    sys.exit(main())
