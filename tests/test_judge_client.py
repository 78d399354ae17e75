"""`mrm-jax judge` against a real chat-completions server on the loopback.

The server derives the truth from the prompt it receives (the item id from the question,
each shown response's stored index from its text) and answers scores that depend on the
stored index, so the test can check that every recorded judgment holds exactly what the
server saw (order) and answered (scores, in presentation order). It injects 429s with
Retry-After, 500s, timeouts, malformed and wrong-length answers.
"""

import collections
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mrm_jax.judge.jobs import plan_jobs, presentation_order, presentation_orders, read_items

KEY = "sk-test-DO-NOT-LEAK-93f1c2"
CLIENT_TIMEOUT = 0.4


def true_score(item_id: str, index: int) -> float:
  """What the fake judge thinks of stored response `index` of `item_id` (distinct per index)."""
  h = int(hashlib.md5(item_id.encode()).hexdigest(), 16) % 3
  return float(index) * 1.5 + 0.5 * h


class FakeJudge:
  """A ThreadingHTTPServer speaking /v1/chat/completions with scripted faults per (id, order)."""

  def __init__(self, faults=None, delay=0.0, always_fail=None):
    self.faults = faults or (lambda item_id, order: [])
    self.delay = delay
    self.always_fail = dict(always_fail or {})  # item id -> the fault of its every attempt
    self.lock = threading.Lock()
    self.attempts = collections.Counter()
    self.answered = collections.defaultdict(list)  # (id, order) -> [scores answered]
    self.events = []  # (time, id, order, kind)
    self.auth_seen = set()
    self.formats = 0
    judge = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *a):
        pass

      def do_POST(self):
        judge.handle(self)

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

  def close(self):
    self.server.shutdown()
    self.server.server_close()

  # -- request handling
  def _send(self, h, status, body, headers=()):
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    try:
      h.send_response(status)
      for k, v in headers:
        h.send_header(k, v)
      h.send_header("Content-Type", "application/json")
      h.send_header("Content-Length", str(len(data)))
      h.end_headers()
      h.wfile.write(data)
      return True
    except (BrokenPipeError, ConnectionResetError):
      return False

  def handle(self, h):
    body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
    auth = h.headers.get("Authorization", "")
    self.auth_seen.add(auth)
    if auth != f"Bearer {KEY}":
      return self._send(h, 401, {"error": {"message": "invalid api key"}})
    msgs = body["messages"]
    assert msgs[0]["role"] == "system" and msgs[1]["role"] == "user"
    parts = msgs[1]["content"]
    text = next(p["text"] for p in parts if p["type"] == "text")
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert all(u.startswith("data:image/png;base64,") for u in images)
    item_id = re.search(r"\[Question\]\nQuestion about (\S+)\?", text).group(1)
    shown = re.findall(r"\[Assistant(?: \d+| Response)\]\nAnswer R(\d+) of ", text)
    order = tuple(int(i) for i in shown)
    key = (item_id, order)
    with self.lock:
      attempt = self.attempts[key]
      self.attempts[key] += 1
      plan = self.faults(item_id, order)
      fault = plan[attempt] if attempt < len(plan) else None
      fault = self.always_fail.get(item_id, fault)
      self.events.append((time.monotonic(), item_id, order, fault or "ok"))
      self.formats += 1
      fmt = self.formats % 4
    scores = [true_score(item_id, i) for i in order]
    n = len(order)
    pointwise = "[Assistant Response]" in text
    if fault == "429":
      return self._send(h, 429, {"error": {"message": "slow down"}}, [("Retry-After", "0.25")])
    if fault == "400":
      return self._send(h, 400, {"error": {"message": "prompt too long"}})
    if fault == "500":
      # A careless server echoing the credentials: the client must not record them.
      return self._send(h, 500, {"error": {"message": f"boom (request had {auth})"}})
    if fault == "timeout":
      time.sleep(CLIENT_TIMEOUT + 0.3)
      return self._send(h, 200, self._chat(self._json(item_id, [0.0] * n, pointwise, 0)))
    if fault == "garbage":
      return self._send(h, 200, "<html>502 bad gateway</html>")
    if fault == "malformed":
      return self._send(h, 200, self._chat("Both assistants did fine; I prefer the first one."))
    if fault == "short":
      return self._send(
        h, 200, self._chat(self._json(item_id, scores[:-1] or [1.0, 2.0], False, fmt))
      )
    if fault == "long":
      return self._send(h, 200, self._chat(self._json(item_id, scores + [5.0], False, fmt)))
    if self.delay:
      time.sleep(self.delay)
    if self._send(h, 200, self._chat(self._json(item_id, scores, pointwise, fmt))):
      with self.lock:
        self.answered[key].append(scores)

  @staticmethod
  def _chat(content):
    return {
      "id": "x",
      "object": "chat.completion",
      "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
      ],
    }

  @staticmethod
  def _json(item_id, scores, pointwise, fmt):
    crit = {"Accuracy": {"Score": 5, "Reason": "ok"}, "Helpfulness": {"Score": 5, "Reason": "ok"}}
    if pointwise:
      obj = {"Reference Answer": {"Assessment": "fine"}, **crit, "Overall Score": scores[0]}
    else:
      obj = {"Reference Answer": {"Assessment": "fine"}}
      for k, s in enumerate(scores, 1):
        obj[f"Assistant {k}"] = {**crit, "Overall Score": s}
    text = json.dumps(obj, indent=1)
    if fmt == 1:  # fenced, with prose
      return f"Here is my evaluation.\n```json\n{text}\n```\nThanks!"
    if fmt == 2:  # trailing commas
      return text.replace("\n}", ",\n}")
    if fmt == 3:  # single quotes
      return text.replace('"', "'")
    return text


def write_candidates(tmp: Path, n_items: int, sizes=(2, 3, 4)) -> Path:
  from PIL import Image

  (tmp / "img").mkdir(exist_ok=True)
  lines = []
  for k in range(n_items):
    iid = f"item-{k}"
    Image.new("RGB", (4, 4), (k * 20 % 255, 0, 0)).save(tmp / "img" / f"{k}.png")
    n = sizes[k % len(sizes)]
    responses = [f"Answer R{i} of {iid}: " + "words " * (3 * i + k % 2) for i in range(n)]
    lines.append(
      {
        "id": iid,
        "images": [f"img/{k}.png"],
        "question": f"<image>Question about {iid}?",
        "reference": "probably a square",
        "responses": responses,
      }
    )
  path = tmp / "cands.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  return path


def judge_cmd(inp, out, url, *extra):
  verbose = ["-v"] if "-v" in extra else []
  extra = [x for x in extra if x != "-v"]
  return [
    sys.executable,
    "-m",
    "mrm_jax.cli",
    *verbose,
    "judge",
    "--input",
    str(inp),
    "--output",
    str(out),
    "--base-url",
    url,
    "--judge-model",
    "fake-judge",
    "--api-key-env",
    "MRM_TEST_JUDGE_KEY",
    "--timeout",
    str(CLIENT_TIMEOUT),
    "--backoff",
    "0.01",
    "--max-backoff",
    "0.05",
    *map(str, extra),
  ]


def env():
  e = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
  e["MRM_TEST_JUDGE_KEY"] = KEY
  return e


def read_out(path: Path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_against_server(records, server, items, mode, repeats, seed):
  """Exactly `repeats` valid judgments per item whose (order, scores) the server saw and
  answered."""
  assert all(list(r) == ["id", "mode", "order", "raw", "scores", "error", "judge"] for r in records)
  jobs, _ = plan_jobs(items, mode, repeats, seed)
  want = collections.Counter((j.item.id, j.order) for j in jobs)
  got = collections.Counter(
    (r["id"], tuple(r["order"])) for r in records if r["scores"] is not None
  )
  assert got == want
  for r in records:
    if r["scores"] is None:
      continue
    assert r["error"] is None and r["judge"] == "fake-judge" and r["mode"] == mode
    key = (r["id"], tuple(r["order"]))
    assert r["scores"] in server.answered[key]
    # Scores are in presentation order: the k-th score belongs to stored index order[k].
    assert r["scores"] == [true_score(r["id"], i) for i in r["order"]]


FAULT_PLANS = [["429", "500"], ["timeout"], ["malformed", "short"], ["long", "garbage", "429"], []]


def faults(item_id, order):
  return FAULT_PLANS[int(item_id.split("-")[1]) % len(FAULT_PLANS)]


def test_listwise_with_injected_faults(tmp_path):
  inp = write_candidates(tmp_path, 10)
  out = tmp_path / "judgments.jsonl"
  server = FakeJudge(faults)
  try:
    proc = subprocess.run(
      judge_cmd(
        inp,
        out,
        server.url,
        "--repeats",
        2,
        "--concurrency",
        6,
        "--max-retries",
        4,
        "--seed",
        7,
        "-v",
      ),
      env=env(),
      capture_output=True,
      text=True,
      timeout=60,
    )
  finally:
    server.close()
  assert proc.returncode == 0, proc.stderr
  records = read_out(out)
  items = read_items(inp)
  assert len(records) == 20 and all(r["scores"] is not None for r in records)
  check_against_server(records, server, items, "listwise", 2, 7)
  for r in records:  # a random order, never the stored one
    assert r["order"] != sorted(r["order"])
  # Every injected fault was met, and a 429's Retry-After (0.25 s) was waited out.
  kinds = collections.Counter(e[3] for e in server.events)
  for kind in ("429", "500", "timeout", "malformed", "short", "long", "garbage"):
    assert kinds[kind] > 0, kind
  by_key = collections.defaultdict(list)
  jobs_per_key = collections.Counter(
    (j.item.id, j.order) for j in plan_jobs(items, "listwise", 2, 7)[0]
  )
  for t, iid, order, kind in server.events:
    if jobs_per_key[(iid, order)] == 1:  # one job per key: its events are one retry sequence
      by_key[(iid, order)].append((t, kind))
  waits = [b[0] - a[0] for ev in by_key.values() for a, b in zip(ev, ev[1:]) if a[1] == "429"]
  assert waits and min(waits) >= 0.24
  # The key was sent, but appears nowhere in what the client wrote or logged.
  assert server.auth_seen == {f"Bearer {KEY}"}
  for text in (out.read_text(), proc.stdout, proc.stderr):
    assert KEY not in text
  assert "ok=20" in proc.stderr.replace(" ", "") or "20 judged" in proc.stdout


def test_failures_are_recorded_then_retried(tmp_path):
  inp = write_candidates(tmp_path, 4)
  out = tmp_path / "j.jsonl"
  server = FakeJudge(always_fail={"item-1": "malformed", "item-2": "500", "item-3": "400"})
  try:
    proc = subprocess.run(
      judge_cmd(inp, out, server.url, "--repeats", 2, "--max-retries", 2, "--no-progress"),
      env=env(),
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    records = read_out(out)
    # item-1's judge answers, but never usably: K = 2 jobs, each tried 1 + R = 3 times, then
    # recorded with the error (DESIGN §7.2).
    failed = [r for r in records if r["id"] == "item-1"]
    assert len(failed) == 2 and all(r["scores"] is None and r["raw"] for r in failed)
    assert all("unusable answer" in r["error"] and "3 attempts" in r["error"] for r in failed)
    assert server.attempts[("item-1", tuple(failed[0]["order"]))] >= 3
    # item-3 gets 400 (this request cannot succeed): recorded after one attempt, not retried.
    refused = [r for r in records if r["id"] == "item-3"]
    assert len(refused) == 2 and all(
      r["scores"] is None and "HTTP 400" in r["error"] and "1 attempt)" in r["error"]
      for r in refused
    )
    assert sum(server.attempts[k] for k in server.attempts if k[0] == "item-3") == 2
    # item-2 gets 500s: the judge was never heard, so nothing is recorded; the run says so (the
    # server echoed the key into its error body: redacted).
    assert not [r for r in records if r["id"] == "item-2"] and len(records) == 6
    assert sum(server.attempts[k] for k in server.attempts if k[0] == "item-2") == 2 * 3
    assert (
      "2 job(s) got no answer" in proc.stderr and "HTTP 500" in proc.stderr and "***" in proc.stderr
    )
    assert KEY not in proc.stderr + proc.stdout
    # A plain restart asks item-2 again and nothing else; --retry-failed then redoes the recorded
    # failures.
    server.always_fail = {"item-1": "malformed", "item-3": "400"}
    n_requests = len(server.events)
    proc = subprocess.run(
      judge_cmd(inp, out, server.url, "--repeats", 2, "--no-progress"),
      env=env(),
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "" and len(read_out(out)) == 8
    assert len(server.events) == n_requests + 2
    server.always_fail.clear()
    n_requests = len(server.events)
    proc = subprocess.run(
      judge_cmd(inp, out, server.url, "--repeats", 2, "--no-progress", "--retry-failed"),
      env=env(),
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
  finally:
    server.close()
  assert len(server.events) == n_requests + 4
  records = read_out(out)
  check_against_server(records, server, read_items(inp), "listwise", 2, 0)


def test_kill_and_resume(tmp_path):
  inp = write_candidates(tmp_path, 30)
  out = tmp_path / "j.jsonl"
  server = FakeJudge(delay=0.03)
  try:
    proc = subprocess.Popen(
      judge_cmd(inp, out, server.url, "--repeats", 2, "--concurrency", 2, "--seed", 3),
      env=env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      if out.exists() and out.read_text().count("\n") >= 12:
        break
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err1 = proc.communicate()
    done_before = read_out_lenient(out)
    assert 12 <= len(done_before) < 60
    with open(out, "a") as f:  # what a kill in the middle of a write leaves behind
      f.write('{"id": "item-0", "mode": "listwise", "ord')
    answered_before = sum(len(v) for v in server.answered.values())
    proc2 = subprocess.run(
      judge_cmd(inp, out, server.url, "--repeats", 2, "--concurrency", 2, "--seed", 3),
      env=env(),
      capture_output=True,
      text=True,
      timeout=60,
    )
  finally:
    server.close()
  assert proc2.returncode == 0, proc2.stderr
  records = read_out(out)
  assert len(records) == 60 and records[: len(done_before)] == done_before
  check_against_server(records, server, read_items(inp), "listwise", 2, 3)
  # The restart asked only for what was missing (plus nothing the first run had finished).
  answered_after = sum(len(v) for v in server.answered.values())
  assert answered_after - answered_before == 60 - len(done_before)
  for text in (out.read_text(), err1.decode(), proc2.stdout, proc2.stderr):
    assert KEY not in text


def read_out_lenient(path):
  return [
    json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")
  ]


def test_pairwise_queue_and_pointwise(tmp_path):
  from PIL import Image

  Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
  queue = tmp_path / "queue.jsonl"
  pairs = [
    {
      "id": f"q-{k}",
      "images": ["a.png"],
      "question": f"Question about q-{k}?",
      "chosen": f"Answer R0 of q-{k}: yes",
      "rejected": f"Answer R1 of q-{k}: no",
    }
    for k in range(3)
  ]
  queue.write_text("".join(json.dumps(p) + "\n" for p in pairs))
  server = FakeJudge(lambda i, o: ["500"] if o == (1, 0) else [])
  try:
    out = tmp_path / "pw.jsonl"
    proc = subprocess.run(
      judge_cmd(queue, out, server.url, "--mode", "pairwise", "--repeats", 2, "--no-progress"),
      env=env(),
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    records = read_out(out)
    check_against_server(records, server, read_items(queue), "pairwise", 2, 0)
    # Both orders of every queued pair; order [0, 1] means the original chosen came first.
    assert sorted((r["id"], tuple(r["order"])) for r in records) == sorted(
      (p["id"], o) for p in pairs for o in [(0, 1), (1, 0)]
    )
    assert all(r["scores"][r["order"].index(1)] > r["scores"][r["order"].index(0)] for r in records)

    cands = write_candidates(tmp_path, 3)
    out = tmp_path / "pt.jsonl"
    proc = subprocess.run(
      judge_cmd(cands, out, server.url, "--mode", "pointwise", "--repeats", 1, "--no-progress"),
      env=env(),
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    records = read_out(out)
    assert len(records) == 2 + 3 + 4
    check_against_server(records, server, read_items(cands), "pointwise", 1, 0)
  finally:
    server.close()


def test_bad_key_and_bad_input(tmp_path):
  inp = write_candidates(tmp_path, 2)
  out = tmp_path / "j.jsonl"
  server = FakeJudge()
  try:
    e = env()
    e["MRM_TEST_JUDGE_KEY"] = "sk-wrong-key-777"
    proc = subprocess.run(
      judge_cmd(inp, out, server.url, "--no-progress"),
      env=e,
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert (
      proc.returncode == 2 and "HTTP 401" in proc.stderr and "sk-wrong-key-777" not in proc.stderr
    )
    assert not out.exists() or read_out(out) == []
    e.pop("MRM_TEST_JUDGE_KEY")
    proc = subprocess.run(
      judge_cmd(inp, out, server.url), env=e, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "MRM_TEST_JUDGE_KEY" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
      '{"id": "a", "question": "q", "responses": ["x", "y"], "images": ["missing.png"]}\n'
    )
    proc = subprocess.run(
      judge_cmd(bad, out, server.url), env=env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and f"{bad}:1" in proc.stderr and "missing.png" in proc.stderr
  finally:
    server.close()


def test_orders_are_pure_and_differ_from_stored():
  for n in (2, 3, 5):
    for r in range(20):
      o = presentation_order("listwise", n, 11, "x", r)
      assert sorted(o) == list(range(n)) and list(o) != list(range(n))
      assert o == presentation_order("listwise", n, 11, "x", r)
  assert (
    len({presentation_order("listwise", 5, s, "x", 0) for s in range(30)}) > 5
  )  # the seed matters
  # Repeats differ from each other while unused orders remain (n = 3: five non-identity orders).
  orders = presentation_orders("listwise", 3, 4, "y", 7)
  assert len(set(orders[:5])) == 5 and (0, 1, 2) not in orders and orders[5] != orders[6]
  assert presentation_orders("listwise", 3, 4, "y", 3) == orders[:3]
  assert presentation_orders("listwise", 2, 4, "y", 3) == [(1, 0)] * 3
  assert presentation_order("pairwise", 2, 0, "x", 0) == (0, 1)
  assert presentation_order("pairwise", 2, 0, "x", 1) == (1, 0)


@pytest.mark.parametrize("value,expected", [("2", 2.0), ("0.5", 0.5), (None, None), ("soon", None)])
def test_retry_after(value, expected):
  from mrm_jax.judge.client import parse_retry_after

  assert parse_retry_after(value) == expected
