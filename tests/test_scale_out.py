"""Each process encodes only its block of the global batch (issue 22), in one process: the blocks
that 4 processes would build, padded to common shapes, offset and joined on the devices, give the
rewards of the batch one process builds; which block a process feeds. The multi-process runs
(launch/local.sh) are in test_train_runs.py, the lanes of the input pipeline in test_pipeline.py."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from test_train_runs import REPO, make_world, overrides

from mrm_jax.config import apply_overrides, load_config_file
from mrm_jax.train import sharding as shd
from mrm_jax.train.data import TrainData, make_processor, pad_to_common_shape


def test_blocks_follow_the_batch_axes():
  # 4 batch positions x 2 tensor devices; owners[position, tensor] = process
  assert shd.batch_blocks(np.array([[0, 0], [0, 0], [1, 1], [1, 1]]), 1) == (1, 2)
  assert shd.batch_blocks(np.array([[0, 0], [1, 1], [2, 2], [3, 3]]), 2) == (2, 4)
  # the tensor axis spans processes: both feed the same block
  assert shd.batch_blocks(np.array([[0, 1], [0, 1], [2, 3], [2, 3]]), 1) == (0, 2)
  # processes interleaved along the batch axes, or unequal runs: no blocks
  assert shd.batch_blocks(np.array([[0, 0], [1, 1], [0, 0], [1, 1]]), 0) is None
  assert shd.batch_blocks(np.array([[0, 0], [0, 0], [0, 0], [1, 1]]), 1) is None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The training world's pairs with questions of 1-4 sentences and every third pair with a
  second, larger image: blocks need different sequence buckets and patch budgets."""
  root = tmp_path_factory.mktemp("blocks")
  make_world(root, n_train=16, n_eval=2)
  Image.new("RGB", (112, 84), (200, 40, 40)).save(root / "img" / "big.png")
  pairs = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
  for i, p in enumerate(pairs):
    p["question"] = "<image>" + "What colour is the square? " * (1 + i % 4)
    if i % 3 == 0:
      p["images"].append("img/big.png")
      p["question"] += "<image>"
  (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  return root


def _cfg(world, share_prompt: bool):
  cfg = load_config_file(str(REPO / "configs" / "demo.py"))
  apply_overrides(
    cfg,
    overrides(
      world,
      **{
        "train.batch_size": 4,
        "data.share_prompt": share_prompt,
        # buckets, so that the blocks pick different sequence lengths and must agree
        "data.seq_buckets": "(48, 64, 96, 128)",
        "data.max_seq_len": 128,
      },
    ),
  )
  return cfg


def _first_batch(cfg, processor, block=(0, 1)):
  data = TrainData(cfg, processor)
  if block[1] > 1:
    data.set_block(*block)
  batch = next(iter(data))
  data.close()
  return batch


def _joined(blocks: list[dict], mesh, unit: int) -> dict:
  """What `put_batch(..., block=(i, count))` gives when process i passes blocks[i] (done in one
  process: the blocks' concatenation is placed on the block mesh, then joined)."""
  count = len(blocks)
  blocks = [shd.offset_block(b, i, unit) for i, b in enumerate(pad_to_common_shape(blocks))]
  bmesh = shd.block_mesh(mesh, count)
  arrays = {}
  for k in blocks[0]:
    axis = shd.ROW_AXIS.get(k, 0)
    spec = [None] * np.ndim(blocks[0][k])
    spec[axis] = "blocks"
    whole = np.concatenate([b[k] for b in blocks], axis=axis)
    arrays[k] = jax.device_put(whole, NamedSharding(bmesh, PartitionSpec(*spec)))
  key = tuple(sorted((k, (tuple(a.shape), a.dtype)) for k, a in arrays.items()))
  return shd._joiner(mesh, 0, count, key)(arrays)


def test_joined_blocks_score_like_the_whole_batch(world):
  """In the two-rows-per-pair layout (the join reorders each block's [chosen, rejected] rows; the
  shared-prompt layout, one row per pair, runs in the multi-process tests)."""
  from mrm_jax.train import loop

  cfg = _cfg(world, share_prompt=False)
  processor = make_processor(cfg, str(world / "model"))
  unit = processor.config.merge_size**2
  whole = _first_batch(cfg, processor)
  setup = loop.Setup(cfg, num_steps=10, devices=jax.devices()[:4])
  state = setup.fresh_state()
  rewards = jax.jit(lambda s, b: setup.model_from_state(s)(b))
  ref = np.asarray(rewards(state, shd.put_batch(whole, setup.mesh)))
  count = 4
  blocks = [_first_batch(cfg, processor, (i, count)) for i in range(count)]
  # each block holds its own pairs: together the whole batch's, in order
  np.testing.assert_array_equal(np.concatenate([b["strength"] for b in blocks]), whole["strength"])
  # the blocks pick their own buckets and budgets: the shapes must agree
  assert len({(b["input_ids"].shape, b["pixel_values"].shape) for b in blocks}) > 1
  joined = _joined(blocks, setup.mesh, unit)
  np.testing.assert_allclose(np.asarray(rewards(state, joined)), ref, atol=1e-5, rtol=0)
  # the joined arrays land where the trainer expects them
  expect = shd.batch_shardings(joined, setup.mesh)
  assert all(joined[k].sharding.is_equivalent_to(expect[k], joined[k].ndim) for k in joined)


def test_processes_agree_on_shapes_and_stop_together(monkeypatch):
  """`agree` (one allgather per step): every process pads to the largest shape of each array; a
  process whose input failed raises its own error, every other one a UserError naming it."""
  from jax.experimental import multihost_utils

  from mrm_jax.errors import UserError
  from mrm_jax.train import data

  sent = {}

  def gather_with(*others):
    def gather(mine):
      sent["row"] = mine
      return np.stack([mine, *others])

    monkeypatch.setattr(multihost_utils, "process_allgather", gather)

  def row_of(batches, error=None, numbers=(0,)):
    """The message a process sends (captured, alone in the gather)."""
    gather_with()
    try:
      data.agree(batches, error, numbers)
    except RuntimeError:
      pass
    return sent["row"]

  small = {"input_ids": np.ones((4, 8), np.int32), "pixel_values": np.ones((16, 3), np.float32)}
  big = {"input_ids": np.ones((4, 12), np.int32), "pixel_values": np.ones((32, 3), np.float32)}
  other = row_of([big], numbers=(7,))
  gather_with(other)
  (got,), numbers = data.agree([small], None, (3,))
  assert got["input_ids"].shape == (4, 12) and got["pixel_values"].shape == (32, 3)
  assert got["input_ids"][:, 8:].sum() == 0 and got["pixel_values"][16:].sum() == 0
  assert numbers.tolist() == [[3], [7]]
  failed = row_of(None, RuntimeError("boom"))
  gather_with(failed)
  with pytest.raises(UserError, match=r"the input of process\(es\) 1 failed"):
    data.agree([small], None, (3,))
  gather_with(other)
  with pytest.raises(RuntimeError, match="boom"):
    data.agree(None, RuntimeError("boom"), (3,))
