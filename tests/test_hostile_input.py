"""Hostile input to every command that reads JSON / JSON Lines: bytes that are not UTF-8, NaN and
Infinity, numbers that overflow a float, absurd nesting, and wrong types of the fields the code
reads. Each is one line on stderr naming file:line, exit code 2, no traceback, and the previous
output left byte for byte as it was; in training such a record is a counted skip instead.

Each command gets good tiny files; one line of one input is replaced by the hostile variant."""

import json
import logging
import re

import pytest

from mrm_jax import cli

# A JSON text fragment spliced into an otherwise good record as `"zz": FRAGMENT` (the value need not
# be read by anything: the reader refuses it before any field is looked at).
GENERIC = {
  "not_utf8": b'"caf\xe9"',
  "nan": b"NaN",
  "infinity": b"-Infinity",
  "float_overflow": b"1e999",
  "deep_nesting": b"[" * 100_000 + b"]" * 100_000,
}


def _line(record: dict) -> bytes:
  return json.dumps(record).encode()


def _spliced(record: dict, fragment: bytes) -> bytes:
  return _line(record)[:-1] + b', "zz": ' + fragment + b"}"


def _write(path, lines: list[bytes]) -> None:
  path.write_bytes(b"".join(line + b"\n" for line in lines))


def _assert_one_line_error(capsys, argv, where: str, outputs, pattern: str = "") -> str:
  """Runs the command; asserts exit 2, exactly one stderr line naming `where`, no traceback, and
  every
  output byte-identical to before."""
  before = {p: p.read_bytes() for p in outputs}
  rc = cli.main([str(a) for a in argv])
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert rc == 2, err
  assert len(lines) == 1 and "Traceback" not in err, err
  assert where in lines[0], lines[0]
  assert re.search(pattern, lines[0]), lines[0]
  for p, data in before.items():
    assert p.read_bytes() == data, f"{p} was changed"
  return lines[0]


def _old_output(path):
  path.write_bytes(b'{"previous": "good output"}\n')
  return path


# ----------------------------------------------------------------------------- the commands


PAIR = {
  "id": "p",
  "images": [],
  "question": "What is shown?",
  "chosen": "A cat.",
  "rejected": "A dog.",
}
LF_PAIR = {
  "conversations": [{"from": "human", "value": "What is shown?"}],
  "chosen": {"from": "gpt", "value": "A cat."},
  "rejected": {"from": "gpt", "value": "A dog."},
  "images": [],
}
SCORING = {"id": "s", "images": [], "question": "What is shown?", "answer": "A cat."}
CANDIDATE = {
  "id": "c",
  "images": [],
  "question": "What is shown?",
  "responses": ["A cat.", "A dog."],
}
JUDGMENT = {
  "id": "c1",
  "mode": "listwise",
  "order": [1, 0],
  "raw": "",
  "scores": [2, 8],
  "error": None,
  "judge": "j",
}
T2I = {"id": "t", "caption": "a red cube", "chosen_image": "a.png", "rejected_image": "b.png"}
VLRB = {
  "id": "RLAIF-V-1",
  "image_path": "a.jpg",
  "query": "What is shown?",
  "response": ["A cat.", "A dog."],
  "human_ranking": [0, 1],
}


def _pairs(k: int, base: dict = PAIR) -> list[dict]:
  out = []
  for i in range(k):
    rec = json.loads(json.dumps(base))
    if "conversations" in rec:
      rec["id"] = f"p{i}"
      rec["chosen"]["value"] += f" {i}"
    else:
      rec.update(id=f"p{i}", chosen=f"A cat {i}.")
    out.append(rec)
  return out


def _score_lines(pairs: list[dict]) -> list[dict]:
  return [
    {"images": [], "question": p["question"], "answer": p[side], "score": s}
    for p in pairs
    for side, s in (("chosen", 1.0), ("rejected", 0.0))
  ]


class World:
  """Good input files for one command, its argv and outputs; `target` is the file whose line 2 is
  replaced, `good` its records."""

  def __init__(self, tmp_path, command: str, target: str):
    self.tmp = tmp_path
    t = tmp_path
    pairs = _pairs(3)
    files: dict[str, list[dict]] = {}
    if command == "score":
      files["in.jsonl"] = [dict(SCORING, id=f"s{i}") for i in range(3)]
      self.outputs = [_old_output(t / "out.jsonl")]
      argv = [
        "score",
        "--model",
        t / "no-model",
        "--input",
        t / "in.jsonl",
        "--output",
        t / "out.jsonl",
      ]
    elif command == "best-of-n":
      files["cands.jsonl"] = [dict(CANDIDATE, id=f"c{i}") for i in range(3)]
      self.outputs = [_old_output(t / "best.jsonl")]
      argv = [
        "best-of-n",
        "--model",
        t / "no-model",
        "--input",
        t / "cands.jsonl",
        "--output",
        t / "best.jsonl",
      ]
    elif command == "evaluate":
      files["bench.jsonl"], files["scores.jsonl"] = pairs, [{"chosen": 1.0, "rejected": 0.0}] * 3
      self.outputs = [_old_output(t / "report.json")]
      argv = [
        "evaluate",
        "--benchmark",
        "pairs",
        "--data",
        t / "bench.jsonl",
        "--scores",
        t / "scores.jsonl",
        "--output",
        t / "report.json",
      ]
    elif command == "evaluate-model":
      files["bench.jsonl"] = pairs
      self.outputs = [_old_output(t / "report.json")]
      argv = [
        "evaluate",
        "--benchmark",
        "pairs",
        "--data",
        t / "bench.jsonl",
        "--model",
        t / "no-model",
        "--output",
        t / "report.json",
      ]
    elif command == "evaluate-vlrb":
      files["vlrb.jsonl"] = [dict(VLRB, id=f"RLAIF-V-{i}") for i in range(3)]
      files["scores.jsonl"] = [{"chosen": 1.0, "rejected": 0.0}] * 3
      self.outputs = [_old_output(t / "report.json")]
      argv = [
        "evaluate",
        "--benchmark",
        "vl_rewardbench",
        "--data",
        t / "vlrb.jsonl",
        "--scores",
        t / "scores.jsonl",
        "--output",
        t / "report.json",
      ]
    elif command == "construct":
      files["cands.jsonl"] = [dict(CANDIDATE, id=f"c{i}") for i in range(3)]
      files["judgments.jsonl"] = [dict(JUDGMENT, id=f"c{i}") for i in range(3)]
      self.outputs = [_old_output(t / "pairs.jsonl"), _old_output(t / "report.json")]
      argv = [
        "construct",
        "--candidates",
        t / "cands.jsonl",
        "--judgments",
        t / "judgments.jsonl",
        "--output",
        t / "pairs.jsonl",
        "--report",
        t / "report.json",
      ]
    elif command == "t2i":
      files["t2i.jsonl"] = [dict(T2I, id=f"t{i}") for i in range(3)]
      self.outputs = [_old_output(t / "pairs.jsonl")]
      argv = ["t2i", "--input", t / "t2i.jsonl", "--output", t / "pairs.jsonl"]
    elif command in ("flip", "filter"):
      files["pairs.jsonl"], files["scores.jsonl"] = pairs, _score_lines(pairs)
      argv = [
        "curate",
        command,
        "--pairs",
        t / "pairs.jsonl",
        "--scores",
        t / "scores.jsonl",
        "--output",
        t / "out.jsonl",
      ]
      self.outputs = [_old_output(t / "out.jsonl")]
      if command == "filter":
        argv += ["--inconsistent", t / "queue.jsonl"]
        self.outputs.append(_old_output(t / "queue.jsonl"))
    elif command == "vote":
      files["queue.jsonl"] = pairs
      files["judgments.jsonl"] = [
        dict(JUDGMENT, id=f"p{i}", mode="pairwise", order=[0, 1], scores=[8, 2]) for i in range(3)
      ]
      self.outputs = [_old_output(t / "out.jsonl")]
      argv = [
        "curate",
        "vote",
        "--queue",
        t / "queue.jsonl",
        "--judgments",
        t / "judgments.jsonl",
        "--output",
        t / "out.jsonl",
        "--min-votes",
        "1",
      ]
    elif command in ("convert", "convert-lf", "convert-vlrb"):
      name, fmt, good = {
        "convert": ("in.jsonl", "canonical", pairs),
        "convert-lf": ("lf.jsonl", "llamafactory", _pairs(3, LF_PAIR)),
        "convert-vlrb": (
          "vlrb.jsonl",
          "vl_rewardbench",
          [dict(VLRB, id=f"RLAIF-V-{i}") for i in range(3)],
        ),
      }[command]
      files[name] = good
      self.outputs = [_old_output(t / "out.jsonl")]
      argv = ["convert", "--input", t / name, "--from", fmt, "--output", t / "out.jsonl"]
    else:
      raise ValueError(command)
    for name, recs in files.items():
      _write(t / name, [_line(r) for r in recs])
    self.argv, self.path, self.good = argv, t / target, files[target]

  def replace_line_2(self, line: bytes) -> None:
    lines = self.path.read_bytes().splitlines()
    lines[1] = line
    _write(self.path, lines)


# (command, the input file that is made hostile): every JSON / JSONL input of every command
INPUTS = [
  ("score", "in.jsonl"),
  ("best-of-n", "cands.jsonl"),
  ("evaluate", "bench.jsonl"),
  ("evaluate", "scores.jsonl"),
  ("evaluate-model", "bench.jsonl"),
  ("evaluate-vlrb", "vlrb.jsonl"),
  ("construct", "cands.jsonl"),
  ("construct", "judgments.jsonl"),
  ("t2i", "t2i.jsonl"),
  ("flip", "pairs.jsonl"),
  ("flip", "scores.jsonl"),
  ("filter", "pairs.jsonl"),
  ("filter", "scores.jsonl"),
  ("vote", "queue.jsonl"),
  ("vote", "judgments.jsonl"),
  ("convert", "in.jsonl"),
  ("convert-lf", "lf.jsonl"),
  ("convert-vlrb", "vlrb.jsonl"),
]


@pytest.mark.parametrize("kind", list(GENERIC))
@pytest.mark.parametrize("command,target", INPUTS, ids=[f"{c}:{t}" for c, t in INPUTS])
def test_undecodable_line_is_a_one_line_error(tmp_path, capsys, command, target, kind):
  w = World(tmp_path, command, target)
  w.replace_line_2(_spliced(w.good[1], GENERIC[kind]))
  pattern = {
    "not_utf8": "not valid UTF-8",
    "nan": "NaN is not a JSON number",
    "infinity": "Infinity is not a JSON number",
    "float_overflow": "too large for a float",
    "deep_nesting": "nested too deeply",
  }[kind]
  _assert_one_line_error(capsys, w.argv, f"{w.path}:2: ", w.outputs, pattern)


# Wrong types of the fields each command reads: (command, target, {field: bad value} merged into
# line 2; None as a value removes the field).
HUGE_INT = 10**400  # valid JSON, exact as an int, but no float holds it
WRONG_TYPES = [
  ("score", "in.jsonl", {"system": 5}),
  ("score", "in.jsonl", {"id": [1]}),
  ("score", "in.jsonl", {"images": 5}),
  ("score", "in.jsonl", {"answer": None}),
  ("score", "in.jsonl", {"videos": "frames"}),
  ("best-of-n", "cands.jsonl", {"system": 5}),
  ("best-of-n", "cands.jsonl", {"id": {"a": 1}}),
  ("best-of-n", "cands.jsonl", {"responses": ["a", 2]}),
  ("evaluate", "bench.jsonl", {"system": 5}),
  ("evaluate", "bench.jsonl", {"meta": 5}),
  ("evaluate", "bench.jsonl", {"strength": "high"}),
  ("evaluate", "scores.jsonl", {"chosen": "1"}),
  ("evaluate", "scores.jsonl", {"rejected": HUGE_INT}),
  ("evaluate", "scores.jsonl", {"chosen": True}),
  ("evaluate-model", "bench.jsonl", {"id": [1, 2]}),
  ("evaluate-vlrb", "vlrb.jsonl", {"human_ranking": [0, 0]}),
  ("evaluate-vlrb", "vlrb.jsonl", {"human_ranking": ["a", "b"]}),
  ("evaluate-vlrb", "vlrb.jsonl", {"human_ranking": [0, 1, 2]}),
  ("evaluate-vlrb", "vlrb.jsonl", {"human_ranking": [True, False]}),
  ("evaluate-vlrb", "vlrb.jsonl", {"human_ranking": {"a": 0}}),
  ("evaluate-vlrb", "vlrb.jsonl", {"response": ["A cat.", 7]}),
  ("construct", "cands.jsonl", {"id": [1]}),
  ("construct", "cands.jsonl", {"responses": "A cat."}),
  ("construct", "judgments.jsonl", {"id": {"x": 1}}),
  ("construct", "judgments.jsonl", {"raw": 5}),
  ("construct", "judgments.jsonl", {"mode": 5}),
  ("construct", "judgments.jsonl", {"order": [0, 0]}),
  ("t2i", "t2i.jsonl", {"caption": 5}),
  ("t2i", "t2i.jsonl", {"id": [1]}),
  ("t2i", "t2i.jsonl", {"source": 5}),
  ("t2i", "t2i.jsonl", {"chosen_image": None}),
  ("flip", "pairs.jsonl", {"system": 5}),
  ("flip", "pairs.jsonl", {"meta": "x"}),
  ("flip", "pairs.jsonl", {"strength": HUGE_INT}),
  ("flip", "pairs.jsonl", {"id": 1.5}),
  ("flip", "pairs.jsonl", {"source": ["a"]}),
  ("flip", "scores.jsonl", {"score": HUGE_INT}),
  ("flip", "scores.jsonl", {"score": "1"}),
  ("filter", "pairs.jsonl", {"images": [1]}),
  ("filter", "scores.jsonl", {"answer": 3}),
  ("vote", "queue.jsonl", {"system": 5}),
  ("vote", "judgments.jsonl", {"id": {"x": 1}}),
  ("vote", "judgments.jsonl", {"mode": ["pairwise"]}),
  ("convert", "in.jsonl", {"chosen": None}),
  ("convert", "in.jsonl", {"system": 5}),
  ("convert", "in.jsonl", {"meta": [1]}),
  ("convert", "in.jsonl", {"strength": HUGE_INT}),
  ("convert-lf", "lf.jsonl", {"chosen": {"from": "gpt", "value": None}}),
  ("convert-lf", "lf.jsonl", {"rejected": {"from": "gpt"}}),
  ("convert-lf", "lf.jsonl", {"chosen": "A cat."}),
  ("convert-lf", "lf.jsonl", {"conversations": [{"from": "human", "value": 5}]}),
  ("convert-lf", "lf.jsonl", {"conversations": ["What is shown?"]}),
  ("convert-lf", "lf.jsonl", {"conversations": {"from": "human", "value": "q"}}),
  ("convert-lf", "lf.jsonl", {"system": 5}),
  ("convert-lf", "lf.jsonl", {"id": [1]}),
  ("convert-vlrb", "vlrb.jsonl", {"human_ranking": [1, 1]}),
  ("convert-vlrb", "vlrb.jsonl", {"id": 5.5}),
]


@pytest.mark.parametrize(
  "command,target,change",
  WRONG_TYPES,
  ids=[f"{c}:{t}:{json.dumps(ch, default=str)[:40]}" for c, t, ch in WRONG_TYPES],
)
def test_wrong_field_type_is_a_one_line_error(tmp_path, capsys, command, target, change):
  w = World(tmp_path, command, target)
  rec = dict(w.good[1])
  for key, value in change.items():
    if value is None and key in rec:
      rec[key] = None
    else:
      rec[key] = value
  w.replace_line_2(_line(rec))
  _assert_one_line_error(capsys, w.argv, f"{w.path}:2: ", w.outputs)


def test_llamafactory_json_list_names_the_item(tmp_path, capsys):
  """In a JSON list `file:N` is item N (as for its good records); decoding errors add the text
  line."""
  items = _pairs(3, LF_PAIR)
  items[2]["chosen"]["value"] = None
  src = tmp_path / "lf.json"
  src.write_text("[\n" + ",\n".join(json.dumps(r) for r in items) + "\n]\n")
  out = _old_output(tmp_path / "out.jsonl")
  argv = ["convert", "--input", src, "--from", "llamafactory", "--output", out]
  line = _assert_one_line_error(capsys, argv, f"{src}:3: ", [out])
  assert "'chosen' should be an object with a string 'value'" in line
  src.write_bytes(b"[\n" + _line(items[0]) + b",\n" + _spliced(items[1], b"NaN") + b"\n]\n")
  _assert_one_line_error(capsys, argv, f"{src}:2: NaN", [out], r"\(list item 2, text line 3\)")
  src.write_bytes(
    b"[" + _line(items[0]) + b", " + _line(items[1]).replace(b"cat", b"c\xe4t") + b"]"
  )
  _assert_one_line_error(capsys, argv, f"{src}: not valid UTF-8", [out], "on text line 1")


def test_construct_refuses_scores_whose_gap_overflows(tmp_path, capsys):
  """Finite but huge judge scores would make `strength` Infinity, which is not JSON."""
  w = World(tmp_path, "construct", "judgments.jsonl")
  w.replace_line_2(_line(dict(JUDGMENT, id="c1", scores=[-1.5e308, 1.5e308])))
  _assert_one_line_error(capsys, w.argv, f"{tmp_path / 'cands.jsonl'}:2: ", w.outputs, "too large")


def test_t2i_neutralises_video_placeholders_in_captions(tmp_path):
  src = tmp_path / "t2i.jsonl"
  _write(src, [_line(dict(T2I, caption="a <video> of a <image>"))])
  assert cli.main(["t2i", "--input", str(src), "--output", str(tmp_path / "pairs.jsonl")]) == 0
  (pair,) = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
  assert "a video of a image" in pair["question"]
  assert pair["question"].count("<image>") == 2 and "<video>" not in pair["question"]


def test_malformed_run_manifest_is_a_one_line_error(tmp_path, capsys):
  work = tmp_path / "run"
  (work / "checkpoints").mkdir(parents=True)
  out = tmp_path / "hf"
  for data, pattern in (
    (b'{"config": {"seed": NaN}}', "NaN"),
    (b'{"config": 1}\xff', "UTF-8"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"seed": 1}', "not a run manifest"),
  ):
    (work / "manifest.json").write_bytes(data)
    _assert_one_line_error(
      capsys,
      ["export", "--checkpoint", work, "--output", out],
      str(work / "manifest.json"),
      [],
      pattern,
    )
  assert not out.exists()


# ----------------------------------------------------------------------------- training: counted
# skips


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
  from model_fixtures import tiny_processor

  return tiny_processor(tmp_path_factory.mktemp("tiny_model"))


def test_training_skips_and_counts_hostile_records(tmp_path, processor, caplog):
  """The records that stop a command are, in training, skipped, counted and logged with file:line
  (DESIGN §5); the good ones train. (`"system": 5` used to end a run with a traceback.) Slot j of
  a batch reads every 4th record from j (the pipeline's lanes): each slot meets two or three bad
  records, then a good one."""
  from mrm_jax.data import pipeline as pl

  good = _pairs(13)
  bad = [
    _line(dict(good[1], system=5)),
    _line(dict(good[2], meta=5)),
    _line(dict(good[3], id=[1])),
    _line(dict(good[4], strength="x")),
    _line({**LF_PAIR, "chosen": {"from": "gpt", "value": None}}),
    _spliced(good[5], GENERIC["not_utf8"]),
    _spliced(good[6], GENERIC["nan"]),
    _spliced(good[7], GENERIC["float_overflow"]),
    _spliced(good[8], GENERIC["deep_nesting"]),
  ]
  lines = bad + [_line(r) for r in good[9:]]
  f = tmp_path / "train.jsonl"
  _write(f, lines)
  caplog.set_level(logging.WARNING, logger="mrm_jax.data.pipeline")
  p = pl.from_processor(
    pl.load_entries(f),
    processor,
    batch_size=4,
    seq_lens=(64,),
    shuffle=False,
    num_epochs=1,
    max_skip_rate=0.9,
    min_checked=1000,
    num_parallel_calls=2,
  )
  (batch,) = list(p)
  assert batch["input_ids"].shape[0] == 8
  assert (p.seen, p.skipped) == (len(lines), len(bad))
  for k in range(len(bad)):
    assert f"{f}:{k + 1}: " in caplog.text, k + 1
  assert "Traceback" not in caplog.text


# ----------------------------------------------------------------------------- writing, and what is
# accepted


def test_json_writers_refuse_nan_and_keep_the_old_file(tmp_path):
  from mrm_jax.errors import UserError
  from mrm_jax.io import dumps, write_json, write_jsonl

  out = _old_output(tmp_path / "out.jsonl")
  with pytest.raises(
    UserError, match=r"cannot write 'meta\.scores\[1\]' as JSON: NaN and Infinity"
  ):
    write_jsonl(out, [{"id": "a"}, {"id": "b", "meta": {"scores": [1.0, float("nan")]}}])
  with pytest.raises(UserError, match="cannot write 'strength'"):
    write_json(out, {"strength": float("inf")})
  assert out.read_bytes() == b'{"previous": "good output"}\n'
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
  assert dumps({"x": 1.5, "y": "é"}) == '{"x": 1.5, "y": "é"}'


def test_integer_ids_are_read_as_strings_and_a_byte_order_mark_is_fine(tmp_path):
  from mrm_jax.data.records import read_pairs

  f = tmp_path / "pairs.jsonl"
  f.write_bytes(
    b"\xef\xbb\xbf"
    + _line(dict(PAIR, id=5))
    + b"\n"
    + _line(dict(PAIR, id="x", system=None))
    + b"\n"
  )
  assert [p["id"] for p in read_pairs(f)] == ["5", "x"]
