"""The training input pipeline: determinism, exact resumption, host sharding, bucketing,
bad-input skipping. The pipeline logic is tested with a transparent toy encoder (bytes as
tokens, 4 patches per image) so every batch can be checked by hand; the last tests run it
with the model's real processor."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from mrm_jax.data import pipeline as pl
from mrm_jax.data.records import resolve_image
from mrm_jax.errors import UserError

PATCHES_PER_IMAGE = 4


def toy_encode(record, image_root, max_len, where="record"):
  """Tokens = UTF-8 bytes of question + answer, truncated from the left (keeps the last token)."""
  for p in record["images"]:
    with Image.open(resolve_image(p, image_root)) as im:
      im.convert("RGB")  # decodes: a broken image raises here, as in the real processor
  ids = np.frombuffer((record["question"] + "|" + record["answer"]).encode(), np.uint8).astype(
    np.int32
  )
  rid = int(record["id"].split(":")[0][1:])
  return {
    "ids": ids[-max_len:],
    "patches": PATCHES_PER_IMAGE * len(record["images"]),
    "rid": rid,
    "chosen": record["id"].endswith(":chosen"),
  }


def toy_collate(examples, seq_len, patch_budget):
  ids = np.zeros((len(examples), seq_len), np.int32)
  for i, e in enumerate(examples):
    ids[i, : len(e["ids"])] = e["ids"]
  assert sum(e["patches"] for e in examples) <= patch_budget
  return {
    "input_ids": ids,
    "rid": np.array([e["rid"] for e in examples]),
    "is_chosen": np.array([e["chosen"] for e in examples]),
    "patch_budget": np.array(patch_budget),
  }


def _world(tmp_path, n=23, bad=()):
  """n pairs r0..r{n-1}; question length varies so buckets differ; every 3rd has an image."""
  (tmp_path / "img").mkdir(exist_ok=True)
  Image.new("RGB", (4, 4), "red").save(tmp_path / "img" / "ok.png")
  lines = []
  for i in range(n):
    rec = {
      "id": f"r{i}",
      "question": "q" * (3 + 7 * (i % 5)),
      "chosen": f"good{i}",
      "rejected": f"bad{i}",
      "images": ["img/ok.png"] if i % 3 == 0 else [],
      "strength": i / 10,
    }
    lines.append(json.dumps(rec))
  for i, line in bad:
    lines[i] = line
  f = tmp_path / "pairs.jsonl"
  f.write_text("\n".join(lines) + "\n")
  return f


def _pipe(path, **kw):
  args = dict(
    encode_fn=toy_encode,
    collate_fn=toy_collate,
    length_fn=lambda e: len(e["ids"]),
    patches_fn=lambda e: e["patches"],
    batch_size=4,
    seq_lens=(16, 32, 64),
    seed=7,
    num_parallel_calls=3,
    min_checked=1000,
  )
  args.update(kw)
  return pl.PairPipeline(pl.load_entries(path), **args)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _lane_batch(epochs, bad, batch, k=0):
  """The records of batch k by the lane rule (see pipeline.py): slot j takes the k-th good record
  of stream positions j, j+B, j+2B, ... (`epochs`: the epochs' orders, concatenated)."""
  stream = np.concatenate(epochs)
  lanes = [[int(r) for r in stream[j::batch] if r not in bad] for j in range(batch)]
  return [lanes[j][k] for j in range(batch)]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_batches_are_pairs_with_strength_and_rows_i_b_plus_i(tmp_path):
  f = _world(tmp_path, n=8)
  (b,) = _take(_pipe(f, batch_size=8, shuffle=False, num_epochs=1), 1)
  np.testing.assert_array_equal(b["rid"], list(range(8)) * 2)
  np.testing.assert_array_equal(b["is_chosen"], [True] * 8 + [False] * 8)
  np.testing.assert_allclose(b["strength"], np.arange(8) / 10)
  assert b["strength"].dtype == np.float32
  # row 3 is chosen of r3, row 11 its rejected: same prompt, different answer
  assert (
    bytes(b["input_ids"][3][b["input_ids"][3] > 0].astype(np.uint8)).decode().endswith("|good3")
  )
  assert (
    bytes(b["input_ids"][11][b["input_ids"][11] > 0].astype(np.uint8)).decode().endswith("|bad3")
  )


def test_same_seed_same_batches_other_seed_other_order(tmp_path):
  f = _world(tmp_path)
  a, b = _take(_pipe(f), 12), _take(_pipe(f), 12)  # 12 batches of 4 > 2 epochs of 23
  _same(a, b)
  c = _take(_pipe(f, seed=8), 12)
  assert any(not np.array_equal(x["rid"], y["rid"]) for x, y in zip(a, c))


def test_epoch_order_is_the_seeded_permutation(tmp_path):
  f = _world(tmp_path, n=23)
  p = _pipe(f, num_epochs=2)
  rids = np.concatenate([b["rid"][:4] for b in p])
  expected = np.concatenate([np.random.default_rng([7, e]).permutation(23) for e in (0, 1)])
  np.testing.assert_array_equal(
    rids, expected[:44]
  )  # 46 records → 11 full batches, across the epoch boundary
  assert p.get_state()["epoch"] == 1 and p.get_state()["position"] == 21


def test_restore_mid_epoch_gives_the_following_batches(tmp_path):
  f = _world(tmp_path, bad=[(5, "{not json")])
  ref = _pipe(f)
  head = _take(ref, 3)
  state = json.loads(json.dumps(ref.get_state()))  # JSON-serialisable
  tail = _take(ref, 9)  # runs into the next epochs
  assert state["epoch"] == 0 and 0 < state["position"] < 23
  resumed = _pipe(f)
  resumed.set_state(state)
  _same(_take(resumed, 9), tail)
  # restoring an iterator that has already run ahead also rewinds it exactly
  ref.set_state(state)
  _same(_take(ref, 9), tail)
  assert len(head) == 3


def test_restore_at_epoch_end(tmp_path):
  f = _world(tmp_path, n=8)
  ref = _pipe(f)
  _take(ref, 2)
  assert ref.get_state()["epoch"] == 1 and ref.get_state()["position"] == 0
  tail = _take(ref, 3)
  other = _pipe(f)
  other.set_state({"epoch": 0, "position": 8})
  _same(_take(other, 3), tail)


@pytest.mark.parametrize("hosts", [2, 3])
def test_host_shards_disjoint_and_cover(tmp_path, hosts):
  f = _world(tmp_path, n=23)
  seen = []
  for h in range(hosts):
    p = _pipe(f, batch_size=hosts, process_index=h, process_count=hosts, num_epochs=1)
    shard = p.shard(0)
    rids = [int(r) for b in p for r in b["rid"][:1]]
    assert rids == list(shard[: len(rids)])  # the host reads its own shard, in order
    seen.append(set(shard.tolist()))
  assert sum(len(s) for s in seen) == 23 and set().union(*seen) == set(range(23))
  with pytest.raises(UserError, match="not divisible by the number of hosts"):
    _pipe(f, batch_size=4, process_count=3)


def test_bucketing_never_exceeds_configured_shapes(tmp_path):
  f = _world(tmp_path)
  for b in _take(_pipe(f, patch_budgets=(8, 16, 32)), 10):
    seq_len = b["input_ids"].shape[1]
    assert seq_len in (16, 32, 64) and b["input_ids"].shape[0] == 8
    lengths = (b["input_ids"] > 0).sum(1)
    assert lengths.max() <= seq_len
    smaller = [s for s in (16, 32, 64) if s < seq_len]
    assert not smaller or lengths.max() > max(smaller)  # the smallest bucket that fits
    assert int(b["patch_budget"]) in (8, 16, 32)
  with pytest.raises(
    UserError, match="needs 24 vision patches, more than the largest configured \\(8\\)"
  ):
    _take(_pipe(f, batch_size=8, patch_budgets=(8,), shuffle=False), 1)


def test_truncation_to_largest_bucket_keeps_final_token(tmp_path):
  f = tmp_path / "long.jsonl"
  f.write_text(
    json.dumps(
      {"id": "r0", "question": "x" * 100, "chosen": "yes!", "rejected": "no?", "images": []}
    )
    + "\n"
  )
  (b,) = _take(_pipe(f, batch_size=1, seq_lens=(16, 32), num_epochs=1), 1)
  assert b["input_ids"].shape == (2, 32)
  assert bytes(b["input_ids"][0].astype(np.uint8)).endswith(b"|yes!")
  assert bytes(b["input_ids"][1].astype(np.uint8)).endswith(b"|no?")


def _bad_world(tmp_path):
  Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
  root = tmp_path / "data"
  (root / "img").mkdir(parents=True)
  (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
  return _world(
    root,
    n=12,
    bad=[
      (1, '{"id": "r1", "question": "q", "chosen": "c"'),  # malformed JSON
      (2, json.dumps({"id": "r2", "question": "q", "chosen": "c"})),  # missing field
      (
        4,
        json.dumps({"id": "r4", "question": "q", "chosen": "c", "rejected": "  "}),
      ),  # empty response
      (
        5,
        json.dumps(
          {"id": "r5", "question": "q", "chosen": "c", "rejected": "r", "images": ["../secret.png"]}
        ),
      ),  # outside the root
      (
        7,
        json.dumps(
          {
            "id": "r7",
            "question": "q",
            "chosen": "c",
            "rejected": "r",
            "images": ["img/broken.png"],
          }
        ),
      ),  # undecodable
      (
        8,
        json.dumps(
          {
            "id": "r8",
            "question": "q",
            "chosen": "c",
            "rejected": "r",
            "images": ["img/missing.png"],
          }
        ),
      ),  # missing image
      (10, json.dumps(["not", "an", "object"])),  # not an object
    ],
  )


def test_every_bad_input_is_skipped_counted_and_logged(tmp_path, caplog):
  f = _bad_world(tmp_path)
  caplog.set_level(logging.WARNING, logger="mrm_jax.data.pipeline")
  # one lane: each batch is the next good record
  p = _pipe(f, batch_size=1, shuffle=False, num_epochs=1, max_skip_rate=0.9)
  batches = list(p)
  assert [int(r) for b in batches for r in b["rid"][:1]] == [0, 3, 6, 9, 11]
  assert (p.seen, p.skipped) == (12, 7)
  msgs = "\n".join(r.getMessage() for r in caplog.records)
  for line, text in [
    (2, "malformed JSON"),
    (3, "missing field 'rejected'"),
    (5, "empty 'rejected' response"),
    (6, "outside the image root"),
    (8, "UnidentifiedImageError"),
    (9, "img/missing.png' not found"),
    (11, "expected a JSON object"),
  ]:
    assert f"{f}:{line}: {text}" in msgs or (f"{f}:{line}:" in msgs and text in msgs), (line, text)
  assert len(caplog.records) == 7


def test_skip_rate_above_threshold_stops(tmp_path):
  f = _bad_world(tmp_path)
  p = _pipe(f, batch_size=1, shuffle=False, max_skip_rate=0.2, min_checked=5)
  with pytest.raises(UserError, match=r"records could not be used .* > max_skip_rate 20.0%"):
    _take(p, 10)
  # under the threshold the same data trains on
  assert (
    len(_take(_pipe(f, batch_size=1, shuffle=False, max_skip_rate=0.7, min_checked=5), 10)) == 10
  )


def test_state_from_another_setup_is_refused(tmp_path):
  p = _pipe(_world(tmp_path))
  with pytest.raises(UserError, match="saved with seed=3"):
    p.set_state({"epoch": 0, "position": 0, "seed": 3})
  with pytest.raises(UserError, match=r"position 99 is outside the data \(23 records\)"):
    p.set_state({"epoch": 0, "position": 99})


# ------------------------------------------------------------------ with the model's real processor


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
  from model_fixtures import tiny_processor

  return tiny_processor(tmp_path_factory.mktemp("tiny_model"))


def _real_world(tmp_path, n=10):
  (tmp_path / "img").mkdir()
  for i, c in enumerate(("red", "green", "blue")):
    Image.new("RGB", (40 + 8 * i, 30), c).save(tmp_path / "img" / f"{i}.png")
  (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  recs = [
    {
      "id": f"r{i}",
      "images": [f"img/{i % 3}.png"] * (1 + i % 2),
      "question": "What is in the image? " * (1 + 3 * (i % 4)),
      "chosen": f"A red circle {i}.",
      "rejected": "The cat sits on the mat.",
      "strength": 0.5 * i,
    }
    for i in range(n)
  ]
  recs[4]["images"] = ["img/broken.jpg"]
  f = tmp_path / "pairs.jsonl"
  f.write_text("".join(json.dumps(r) + "\n" for r in recs))
  return f, recs


def test_real_processor_rows_buckets_and_resume(tmp_path, processor):
  f, recs = _real_world(tmp_path)
  kw = dict(
    batch_size=3,
    seq_lens=(48, 96, 160),
    patch_budgets=(64, 128, 256),
    seed=1,
    num_parallel_calls=2,
    min_checked=1000,
  )
  ref = pl.from_processor(pl.load_entries(f), processor, **kw)
  first = _take(ref, 2)
  state = ref.get_state()
  tail = _take(ref, 3)
  resumed = pl.from_processor(pl.load_entries(f), processor, **kw)
  resumed.set_state(json.loads(json.dumps(state)))
  _same(_take(resumed, 3), tail)
  _same(_take(pl.from_processor(pl.load_entries(f), processor, **kw), 2), first)

  perms = [np.random.default_rng([1, e]).permutation(10) for e in (0, 1)]
  order = _lane_batch(perms, {4}, 3)  # r4's image is broken: its lane takes its next record
  b = first[0]
  assert b["input_ids"].shape[0] == 6 and b["input_ids"].shape[1] in (48, 96, 160)
  assert (
    b["pixel_values"].shape[0] in (64, 128, 256)
    and b["vision_segment_ids"].shape == b["pixel_values"].shape[:1]
  )
  np.testing.assert_allclose(b["strength"], [0.5 * i for i in order[:3]])
  for row, i in enumerate(order[:3]):
    for r, answer in ((row, recs[i]["chosen"]), (row + 3, recs[i]["rejected"])):
      enc = processor.encode(
        {"images": recs[i]["images"], "question": recs[i]["question"], "answer": answer},
        tmp_path,
        160,
      )
      np.testing.assert_array_equal(b["input_ids"][r, : enc.length], enc.input_ids)
      assert b["attention_mask"][r].sum() == enc.length
  lengths = b["attention_mask"].sum(1)
  assert lengths.max() <= b["input_ids"].shape[1] and not any(
    s >= lengths.max() for s in (48, 96, 160) if s < b["input_ids"].shape[1]
  )


def test_real_processor_shared_prompt_rows_and_resume(tmp_path, processor):
  """share_prompt: one row per pair holding both encodings (the prompt once), row and sequence
  buckets from the configured lengths, and the same resume guarantee."""
  f, recs = _real_world(tmp_path)
  seq_lens = (48, 96, 160)
  kw = dict(
    batch_size=3,
    seq_lens=seq_lens,
    patch_budgets=(64, 128, 256),
    seed=1,
    num_parallel_calls=2,
    min_checked=1000,
    share_prompt=True,
  )
  ref = pl.from_processor(pl.load_entries(f), processor, **kw)
  first = _take(ref, 1)
  state = ref.get_state()
  tail = _take(ref, 2)
  resumed = pl.from_processor(pl.load_entries(f), processor, **kw)
  resumed.set_state(json.loads(json.dumps(state)))
  _same(_take(resumed, 2), tail)

  order = _lane_batch([np.random.default_rng([1, e]).permutation(10) for e in (0, 1)], {4}, 3)
  b = first[0]
  assert b["input_ids"].shape[0] == 3 and b["input_ids"].shape[1] in pl.row_buckets(seq_lens)
  assert b["pair_b_index"].shape[1] in seq_lens and b["reward_index"].shape == (3, 2)
  for row, i in enumerate(order[:3]):
    base = {"images": recs[i]["images"], "question": recs[i]["question"]}
    c, r = (
      processor.encode(dict(base, answer=recs[i][k]), tmp_path, 160) for k in ("chosen", "rejected")
    )
    a_len, b_len, _ = b["pair_lengths"][row]
    np.testing.assert_array_equal(b["input_ids"][row, :a_len], c.input_ids)
    np.testing.assert_array_equal(b["input_ids"][row, b["pair_b_index"][row, :b_len]], r.input_ids)
    np.testing.assert_array_equal(
      b["position_ids"][:, row, b["pair_b_index"][row, :b_len]], r.position_ids
    )
    assert (a_len, b_len) == (c.length, r.length)
    assert b["attention_mask"][row].sum() < c.length + r.length  # the prompt once
    assert tuple(b["reward_index"][row]) == (c.length - 1, b["pair_b_index"][row, b_len - 1])
  # each pair's images once
  assert (b["vision_segment_ids"] > 0).sum() == sum(
    processor.encode(
      {"images": recs[i]["images"], "question": "", "answer": "x"}, tmp_path, 160
    ).num_patches
    for i in order[:3]
  )


def test_real_processor_truncation_keeps_final_token_and_skips_broken_image(
  tmp_path, processor, caplog
):
  f, recs = _real_world(tmp_path)
  p = pl.from_processor(
    pl.load_entries(f),
    processor,
    batch_size=9,
    seq_lens=(40,),
    shuffle=False,
    num_epochs=2,
    min_checked=1000,
  )
  (b,) = list(p)  # the second batch would need a third record of lane 4, past the end
  assert (p.seen, p.skipped) == (10, 1)
  assert f"{f}:5:" in caplog.text
  assert b["input_ids"].shape[1] == 40
  # r4's lane (slot 4) takes its next record: the second epoch's r3
  good = [recs[k] for k in (0, 1, 2, 3, 3, 5, 6, 7, 8)]
  for row, rec in enumerate(good):
    full = processor.encode(
      {"images": rec["images"], "question": rec["question"], "answer": rec["chosen"]},
      tmp_path,
      10_000,
    )
    n = int(b["attention_mask"][row].sum())
    assert n == full.length if full.length <= 40 else 0 < n <= 40
    assert b["input_ids"][row, n - 1] == full.input_ids[-1]  # the scored token survives truncation
    assert (b["input_ids"][row, :n] == processor.config.image_token_id).sum() == (
      full.input_ids == processor.config.image_token_id
    ).sum()  # vision tokens are never cut
  assert any(
    processor.encode(
      {"images": r["images"], "question": r["question"], "answer": r["chosen"]}, tmp_path, 10_000
    ).length
    > 40
    for r in good
  )  # truncation really happened


def test_video_folder_pairs_reach_the_processor_as_frame_lists(tmp_path, processor):
  (tmp_path / "video" / "clip").mkdir(parents=True)
  for k in range(3):
    Image.new("RGB", (56, 56), (80 * k, 0, 0)).save(tmp_path / "video" / "clip" / f"{k:03d}.jpg")
  f = tmp_path / "mm.jsonl"
  f.write_text(
    json.dumps({"id": "w", "video": "video/none", "prompt": "?", "chosen": "a", "rejected": "b"})
    + "\n"
    + json.dumps(
      {
        "id": "v",
        "video": "video/clip",
        "prompt": "What happens?",
        "chosen": "It turns red.",
        "rejected": "Nothing.",
      }
    )
    + "\n"
  )
  from mrm_jax.data import readers

  out = tmp_path / "pairs.jsonl"
  out.write_text("".join(json.dumps(p) + "\n" for p in readers.read_all(f, "mm_rlhf")))
  p = pl.from_processor(
    pl.load_entries(out),
    processor,
    batch_size=1,
    seq_lens=(256,),
    shuffle=False,
    num_epochs=1,
    max_skip_rate=0.9,
  )
  (b,) = list(p)
  assert p.skipped == 1  # the missing folder
  frames = [f"video/clip/{k:03d}.jpg" for k in range(3)]
  enc = processor.encode(
    {"videos": [frames], "question": "What happens?", "answer": "It turns red."}, tmp_path, 256
  )
  np.testing.assert_array_equal(b["input_ids"][0, : enc.length], enc.input_ids)
  assert (enc.input_ids == processor.config.video_token_id).sum() > 0


# ------------------------------------------------------------------ length-grouped batches


def test_length_groups_by_hand():
  from mrm_jax.data.ordering import epoch_order

  lengths = np.array([5, 1, 9, 3, 7, 2, 8, 4])
  # shuffle off: groups of 2 batches of 2 in file order, each group sorted longest first
  order = epoch_order(
    8, seed=0, epoch=0, shuffle=False, lengths=lengths, batch_size=2, group_batches=2
  )
  np.testing.assert_array_equal(order, [2, 0, 3, 1, 6, 4, 7, 5])
  # shuffled: the same construction on the seeded permutation, then the batches in a seeded order
  perm = np.random.default_rng([3, 1]).permutation(8)
  groups = [g[np.argsort(-lengths[g], kind="stable")] for g in (perm[:4], perm[4:])]
  batches = np.concatenate(groups).reshape(4, 2)[np.random.default_rng([3, 1, 1]).permutation(4)]
  got = epoch_order(8, seed=3, epoch=1, lengths=lengths, batch_size=2, group_batches=2)
  np.testing.assert_array_equal(got, batches.ravel())
  assert sorted(got.tolist()) == list(range(8))
  # a remainder shorter than a batch stays at the end; no grouping = the plain permutation
  tail = epoch_order(
    9, seed=0, epoch=0, shuffle=False, lengths=np.arange(9), batch_size=2, group_batches=2
  )
  assert sorted(tail.tolist()) == list(range(9)) and tail[-1] == 8
  np.testing.assert_array_equal(
    epoch_order(8, seed=3, epoch=1, lengths=lengths, batch_size=2),
    np.random.default_rng([3, 1]).permutation(8),
  )


def test_length_grouping_cuts_padding_and_resumes_exactly(tmp_path):
  f = _world(tmp_path, n=40)
  entries = pl.load_entries(f)
  lengths = [len(e.record["question"]) + 6 for e in entries]  # the toy encoder's token count
  padded = {}
  for group in (0, 5):
    p = _pipe(
      f, lengths=lengths, group_batches=group, seq_lens=tuple(range(8, 65, 8)), num_epochs=3
    )
    batches = list(p)
    real = sum(int((b["input_ids"] > 0).sum()) for b in batches)
    padded[group] = sum(b["input_ids"].size for b in batches) / real
    assert sorted(r for b in batches[:10] for r in b["rid"][:4].tolist()) == list(range(40))
  assert padded[5] < 0.85 * padded[0], padded  # 1.49 -> 1.23 tokens per real token
  ref = _pipe(f, lengths=lengths, group_batches=5)
  _take(ref, 4)
  state = ref.get_state()
  tail = _take(ref, 8)
  resumed = _pipe(f, lengths=lengths, group_batches=5)
  resumed.set_state(state)
  _same(_take(resumed, 8), tail)


def test_estimated_lengths_track_the_encoded_ones(tmp_path, processor):
  from mrm_jax.data.records import pair_to_scoring
  from mrm_jax.train.data import estimate_lengths

  f, recs = _real_world(tmp_path)
  entries = pl.load_entries(f)
  est = estimate_lengths(entries, processor)
  assert est[4] > 0  # a broken image still has a header-less estimate: its text
  offsets = []
  for k, e in enumerate(entries):
    if k == 4:
      continue
    pair, _ = pl.check_pair(e)
    rows = [processor.encode(r, e.image_root, 10_000) for r in pair_to_scoring(pair)]
    # the chat template's constant tokens, plus the vision start/end markers of each image
    offsets.append(max(r.length for r in rows) - int(est[k]) - 2 * len(pair["images"]))
  assert max(offsets) - min(offsets) <= 2, offsets


# ------------------------------------------------------------------ lanes and processes


def _global(pipes, k):
  """k global batches from one pipeline per process: the pairs of each process's block, in order."""
  out = []
  for blocks in zip(*[_take(p, k) for p in pipes]):
    out.append(
      [
        (int(r), float(s))
        for b in blocks
        for r, s in zip(b["rid"][: len(b["strength"])], b["strength"])
      ]
    )
  return out


def _procs(f, hosts, batch_size=4, **kw):
  return [
    _pipe(f, batch_size=batch_size, process_index=h, process_count=hosts, **kw)
    for h in range(hosts)
  ]


def test_processes_encode_their_lanes_and_join_to_the_same_batches(tmp_path):
  """With skipped records the global batches (blocks joined in process order) are the same on
  1, 2 and 4 processes, and each process encodes only its lanes' records."""
  f = _world(tmp_path, n=23, bad=[(5, "{not json"), (11, "[]"), (12, "{")])
  (one,) = _procs(f, 1)
  ref = _global([one], 9)  # into the second epoch
  order = [np.random.default_rng([7, e]).permutation(23) for e in range(2)]
  assert [[r for r, _ in b] for b in ref] == [
    _lane_batch(order, {5, 11, 12}, 4, k) for k in range(9)
  ]
  assert one.seen == 36 + one.skipped and one.skipped >= 3  # the bad records, once per epoch
  for hosts in (2, 4):
    pipes = _procs(f, hosts)
    assert _global(pipes, 9) == ref, hosts
    # each process reads its own lanes' records only, plus what it reads ahead: the prefetched
    # batches, one in each stage, and the parallel encoder's calls in flight
    assert sum(p.seen for p in pipes) == one.seen
    assert sum(p.skipped for p in pipes) == one.skipped
    for p in pipes:
      ahead = (p.prefetch + 3) * p.local_batch + p.num_parallel_calls
      assert p.seen <= 36 // hosts + one.skipped and p.encoded <= p.seen + ahead, hosts


def test_a_state_merged_from_two_processes_resumes_on_one_and_four(tmp_path):
  f = _world(tmp_path, n=23, bad=[(5, "{not json"), (11, "[]"), (12, "{")])
  two = _procs(f, 2)
  head = _global(two, 4)
  merged = pl.lanes_state(
    {j: p for q in two for j, p in q.lane_positions().items()},
    4,
    23,
    seen=sum(q.seen for q in two),
    skipped=sum(q.skipped for q in two),
    seed=7,
  )
  assert merged["lanes_ahead"]  # some lane ran ahead past a skipped record
  assert merged["skipped"] >= 1 and merged["seen"] == 16 + merged["skipped"]
  merged = json.loads(json.dumps(merged))
  one = _procs(f, 1)
  whole = _global(one, 7)
  assert whole[:4] == head
  for hosts in (1, 4):
    pipes = _procs(f, hosts)
    for p in pipes:
      p.set_state(merged)
    assert _global(pipes, 3) == whole[4:], hosts
  (p,) = _procs(f, 1)
  p.set_state(merged)
  assert (p.seen, p.skipped) == (merged["seen"], merged["skipped"])


def test_another_batch_size_resumes_only_an_aligned_state(tmp_path):
  f = _world(tmp_path, n=23)
  (p,) = _procs(f, 1)
  _take(p, 2)
  state = p.get_state()
  assert state["lanes_ahead"] == {} and (state["epoch"], state["position"]) == (0, 8)
  (q,) = _procs(f, 1, batch_size=2)
  q.set_state(state)  # the stream continues at record 8 of the epoch, in batches of 2
  order = np.random.default_rng([7, 0]).permutation(23)
  np.testing.assert_array_equal(next(q)["rid"][:2], order[8:10])
  state["lanes_ahead"] = {"1": 1}
  with pytest.raises(UserError, match="saved with batch size 4, this run has 2"):
    q.set_state(state)


def test_a_lane_of_unusable_records_stops_the_run(tmp_path):
  """Nothing but broken records: no batch is ever complete, so the skip rate (checked per batch)
  would never be; the lane that meets 100 in a row stops the run."""
  f = _world(tmp_path, n=5, bad=[(i, "{") for i in range(5)])
  with pytest.raises(UserError, match="100 records in a row could not be used"):
    next(_pipe(f, batch_size=2, min_checked=10))
