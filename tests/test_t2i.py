"""`mrm-jax t2i`: the two-image reformulation of T2I preferences (DESIGN §3.2b, §8)."""

import io
import json

import pytest

from mrm_jax import cli
from mrm_jax.construct.t2i import chosen_first_indices, reformulate
from mrm_jax.data.records import REWARD_SYSTEM_PROMPT, read_pairs
from mrm_jax.errors import UserError

RECORDS = [
  {"id": "a", "caption": "a red cube", "chosen_image": "a_good.png", "rejected_image": "a_bad.png"},
  {"caption": "two cats", "chosen_image": "b_good.png", "rejected_image": "b_bad.png"},
  {"id": "c", "caption": "a blue sky", "chosen_image": "c_good.png", "rejected_image": "c_bad.png"},
  {"id": "d", "caption": "an old car", "chosen_image": "d_good.png", "rejected_image": "d_bad.png"},
  {
    "id": "e",
    "caption": "a <image> tag",
    "chosen_image": "e_good.png",
    "rejected_image": "e_bad.png",
  },
]
ONE_FIRST, TWO_FIRST = "Image 1 is better than Image 2.", "Image 2 is better than Image 1."


def test_hand_computed_fixture():
  # random.Random(42).shuffle([0, 1, 2, 3, 4]) == [3, 1, 2, 4, 0]: the first floor(5/2) = 2, {3, 1},
  # show the preferred image first.
  assert chosen_first_indices(5, 42) == {1, 3}
  pairs = reformulate(RECORDS, seed=42)
  assert [(p["id"], p["images"], p["chosen"], p["rejected"]) for p in pairs] == [
    ("a", ["a_bad.png", "a_good.png"], TWO_FIRST, ONE_FIRST),
    ("t2i-1", ["b_good.png", "b_bad.png"], ONE_FIRST, TWO_FIRST),
    ("c", ["c_bad.png", "c_good.png"], TWO_FIRST, ONE_FIRST),
    ("d", ["d_good.png", "d_bad.png"], ONE_FIRST, TWO_FIRST),
    ("e", ["e_bad.png", "e_good.png"], TWO_FIRST, ONE_FIRST),
  ]
  assert pairs[0]["question"] == (
    'The two images below were generated for the caption: "a red cube"\n'
    "Image 1: <image>\nImage 2: <image>\n"
    "Which image matches the caption better and has better visual quality?"
  )
  assert pairs[4]["question"].count("<image>") == 2  # a placeholder inside a caption is neutralised
  assert all(p["system"] == REWARD_SYSTEM_PROMPT and p["source"] == "t2i" for p in pairs)
  assert pairs[1]["meta"] == {"caption": "two cats", "chosen_position": 1}


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 31])
def test_balance_and_labels(n):
  records = [
    {"id": str(k), "caption": f"c{k}", "chosen_image": f"g{k}.png", "rejected_image": f"b{k}.png"}
    for k in range(n)
  ]
  for seed in (0, 1, 42):
    pairs = reformulate(records, seed=seed)
    first = [p for p in pairs if p["images"][0].startswith("g")]
    assert len(first) == n // 2
    for rec, p in zip(records, pairs):
      pos = p["images"].index(rec["chosen_image"]) + 1
      assert p["chosen"] == f"Image {pos} is better than Image {3 - pos}."
      assert p["rejected"] == f"Image {3 - pos} is better than Image {pos}."
      assert sorted(p["images"]) == sorted([rec["chosen_image"], rec["rejected_image"]])
    assert reformulate(records, seed=seed) == pairs
  if n >= 10:
    assert reformulate(records, seed=0) != reformulate(records, seed=1)


def write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_cli_generic(tmp_path, capsys):
  inp = write(tmp_path / "t2i.jsonl", RECORDS)
  out = tmp_path / "pairs.jsonl"
  assert cli.main(["t2i", "--input", str(inp), "--output", str(out)]) == 0  # default seed 42
  pairs = [json.loads(line) for line in out.read_text().splitlines()]
  assert pairs == reformulate(RECORDS, seed=42)
  assert "2 with the preferred image first" in capsys.readouterr().out
  lf = tmp_path / "lf.jsonl"
  assert (
    cli.main(
      ["t2i", "--input", str(inp), "--output", str(lf), "--format", "llamafactory", "--seed", "42"]
    )
    == 0
  )
  rec = json.loads(lf.read_text().splitlines()[0])
  assert (
    rec["conversations"][0]["value"] == pairs[0]["question"] and rec["chosen"]["value"] == TWO_FIRST
  )
  assert [(p["images"], p["chosen"], p["rejected"]) for p in read_pairs(lf)] == [
    (p["images"], p["chosen"], p["rejected"]) for p in pairs
  ]
  bad = write(tmp_path / "bad.jsonl", RECORDS[:2] + [{"caption": "x", "chosen_image": "y.png"}])
  assert cli.main(["t2i", "--input", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
  assert f"{bad}:3: field 'rejected_image'" in capsys.readouterr().err
  assert not (tmp_path / "o.jsonl").exists()
  with pytest.raises(UserError, match="same image"):
    reformulate([{"caption": "x", "chosen_image": "s.png", "rejected_image": "s.png"}])


def test_cli_pickapic(tmp_path):
  """Native Pick-a-Pic v2 parquet through the data readers (ties dropped, images extracted)."""
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  from PIL import Image

  def jpg(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()

  rows = [  # (caption, label_0, label_1)
    ("red", 1.0, 0.0),
    ("green", 0.0, 1.0),
    ("tie", 0.5, 0.5),
    ("blue", 1.0, 0.0),
    ("gray", 0.0, 1.0),
  ]
  imgs = [(jpg((k * 40 + 20, 0, 0)), jpg((0, k * 40 + 20, 0))) for k in range(len(rows))]
  table = pa.table(
    {
      "ranking_id": [f"r{k}" for k in range(len(rows))],
      "caption": [r[0] for r in rows],
      "jpg_0": [i[0] for i in imgs],
      "jpg_1": [i[1] for i in imgs],
      "label_0": [r[1] for r in rows],
      "label_1": [r[2] for r in rows],
    }
  )
  src = tmp_path / "pickapic.parquet"
  pq.write_table(table, src)
  out = tmp_path / "out" / "pairs.jsonl"
  assert (
    cli.main(
      ["t2i", "--input", str(src), "--output", str(out), "--from", "pickapic", "--seed", "7"]
    )
    == 0
  )
  pairs = [json.loads(line) for line in out.read_text().splitlines()]
  assert [p["id"] for p in pairs] == ["r0", "r1", "r3", "r4"]
  assert sum(p["chosen"] == ONE_FIRST for p in pairs) == 2
  for p, k in zip(pairs, [0, 1, 3, 4]):
    pos = int(p["chosen"][6])
    preferred = imgs[k][0] if rows[k][1] > rows[k][2] else imgs[k][1]
    assert (out.parent / p["images"][pos - 1]).read_bytes() == preferred
