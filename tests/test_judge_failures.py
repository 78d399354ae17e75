"""`mrm-jax judge` when the judge is not there or not a judge: closed ports, HTML, garbage bodies,
servers that trickle; and the judge's own bad input (options, candidates, a resumed output).

A job that never got an answer is not a judgment: it is not recorded, the command exits 1 when no
job got one, and the next run asks again without `--retry-failed`.
"""

import argparse
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
from test_judge_client import (
  KEY,
  FakeJudge,
  check_against_server,
  env,
  judge_cmd,
  read_out,
  write_candidates,
)

from mrm_jax import cli
from mrm_jax.commands import judge as judge_cli
from mrm_jax.errors import UserError
from mrm_jax.judge.client import ChatClient, RetryableError
from mrm_jax.judge.jobs import read_items

BODIES = {
  "html": (b"<!DOCTYPE html><html><body><h1>It works!</h1></body></html>", "text/html"),
  "garbage": (bytes(range(256)) * 4, "application/octet-stream"),
  "not_chat": (
    json.dumps({"object": "list", "data": [{"id": "some-model"}]}).encode(),
    "application/json",
  ),
}


class NotAJudge:
  """A loopback HTTP server answering every POST with `kind`: a fixed body, or a slow trickle of the
  status line ("trickle_headers") or of a body ("trickle_body"), one byte each 0.2 s for ~12 s."""

  def __init__(self, kind, tls=None):
    self.requests = 0
    self.stop = threading.Event()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *a):
        pass

      def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        server.requests += 1
        try:
          server.answer(self, kind)
        except (BrokenPipeError, ConnectionResetError):
          pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    if tls is not None:  # (cert.pem, key.pem)
      context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
      context.load_cert_chain(*tls)
      self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    scheme, host = ("https", "localhost") if tls else ("http", "127.0.0.1")
    self.url = f"{scheme}://{host}:{self.httpd.server_address[1]}/v1"

  def answer(self, h, kind):
    if kind in BODIES:
      body, ctype = BODIES[kind]
      h.send_response(200)
      h.send_header("Content-Type", ctype)
      h.send_header("Content-Length", str(len(body)))
      h.end_headers()
      h.wfile.write(body)
      return
    if kind == "trickle_body":
      h.send_response(200)
      h.send_header("Content-Length", "1000")
      h.end_headers()
    h.wfile.write(b"HTTP/1.1 200 OK\r\n" if kind == "trickle_headers" else b"")
    for _ in range(60):
      if self.stop.wait(0.2):
        return
      h.wfile.write(b"X" if kind == "trickle_headers" else b" ")
      h.wfile.flush()

  def close(self):
    self.stop.set()
    self.httpd.shutdown()
    self.httpd.server_close()


def closed_port_url():
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return f"http://127.0.0.1:{port}/v1"


def run_judge(inp, out, url, *extra):
  return subprocess.run(
    judge_cmd(inp, out, url, "--no-progress", "--max-retries", 1, *extra),
    env=env(),
    capture_output=True,
    text=True,
    timeout=60,
  )


def assert_unreachable(proc, url, first_error):
  """Exit 1 with one stderr line naming the URL and the first error, the key nowhere."""
  lines = proc.stderr.splitlines()
  assert proc.returncode == 1, proc.stderr
  assert len(lines) == 1 and lines[0].startswith(
    "mrm-jax judge: error: could not reach the judge at "
  ), lines
  assert url in lines[0] and first_error in lines[0]
  assert "Traceback" not in proc.stderr and KEY not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
  "kind,first_error",
  [
    ("closed", "Connection refused"),
    ("html", "not a chat completion"),
    ("garbage", "not a chat completion"),
    ("not_chat", "not a chat completion"),
  ],
)
def test_unreachable_judge_exits_1_then_resumes(tmp_path, kind, first_error):
  inp = write_candidates(tmp_path, 3)
  out = tmp_path / "j.jsonl"
  bad = None if kind == "closed" else NotAJudge(kind)
  try:
    url = closed_port_url() if bad is None else bad.url
    proc = run_judge(inp, out, url, "--repeats", 2)
  finally:
    if bad is not None:
      bad.close()
  assert_unreachable(proc, url, first_error)
  assert not out.exists() or read_out(out) == []
  # The same command against a working judge asks every job: none was counted as done. And -v is
  # accepted after the subcommand.
  server = FakeJudge()
  try:
    proc = run_judge(inp, out, server.url, "--repeats", 2, "-v", "--verbose")
  finally:
    server.close()
  assert proc.returncode == 0, proc.stderr
  records = read_out(out)
  assert len(records) == 6
  check_against_server(records, server, read_items(inp), "listwise", 2, 0)


def test_unreachable_judge_stops_early(tmp_path):
  """20 jobs, one at a time, no retries: a few failures without any answer end the run."""
  inp = write_candidates(tmp_path, 10)
  bad = NotAJudge("html")
  try:
    proc = run_judge(inp, tmp_path / "j.jsonl", bad.url, "--concurrency", 1, "--max-retries", 0)
  finally:
    bad.close()
  assert_unreachable(proc, bad.url, "<!DOCTYPE html>")
  assert 3 <= bad.requests <= 4  # UNREACHABLE_AFTER, plus the one job already started


def _assert_request_ends_at_the_timeout(bad):
  try:
    client = ChatClient(bad.url, "m", timeout=1.0)
    start = time.monotonic()
    with pytest.raises(RetryableError, match="timed out after 1s"):
      client.complete([{"role": "user", "content": "hello"}])
    assert time.monotonic() - start < 2.0
  finally:
    bad.close()


@pytest.mark.parametrize("kind", ["trickle_headers", "trickle_body"])
def test_timeout_bounds_the_whole_request(kind):
  """A server sending a byte every 0.2 s never trips a per-read timeout; the request still ends at 1
  s."""
  bad = NotAJudge(kind)
  _assert_request_ends_at_the_timeout(bad)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_timeout_bounds_the_whole_request_over_tls(tmp_path, monkeypatch):
  """Under TLS the socket read is another object (wrapping detaches the plain socket): still 1 s."""
  cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
  subprocess.run(
    [
      "openssl",
      "req",
      "-x509",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-keyout",
      key,
      "-out",
      cert,
      "-days",
      "1",
      "-subj",
      "/CN=localhost",
      "-addext",
      "subjectAltName=DNS:localhost",
    ],
    check=True,
    capture_output=True,
    timeout=60,
  )
  monkeypatch.setenv("SSL_CERT_FILE", str(cert))
  bad = NotAJudge("trickle_body", tls=(cert, key))
  _assert_request_ends_at_the_timeout(bad)


def test_verbose_after_any_subcommand():
  for argv in (
    [
      "judge",
      "--input",
      "a",
      "--output",
      "b",
      "--base-url",
      "http://x",
      "--judge-model",
      "m",
      "-v",
    ],
    ["score", "--model", "m", "--input", "a", "--output", "b", "-v"],
    ["curate", "flip", "--pairs", "p", "--scores", "s", "--output", "o", "--verbose"],
  ):
    args, extra = cli._build_parser(cli._selected_command(argv)).parse_known_args(argv)
    assert args.verbose is True and extra == [], argv
    args, _ = cli._build_parser(cli._selected_command(argv)).parse_known_args(argv[:-1])
    assert args.verbose is False
    args, _ = cli._build_parser(cli._selected_command(argv)).parse_known_args(["-v", *argv[:-1]])
    assert args.verbose is True  # not reset by the subcommand's own (absent) flag


def judge_parser():
  p = argparse.ArgumentParser(prog="mrm-jax judge")
  judge_cli.add_arguments(p)
  return p


REQUIRED = [
  "--input",
  "c.jsonl",
  "--output",
  "j.jsonl",
  "--base-url",
  "http://127.0.0.1:1/v1",
  "--judge-model",
  "m",
]


@pytest.mark.parametrize(
  "option,value",
  [
    ("--timeout", "nan"),
    ("--timeout", "inf"),
    ("--timeout", "0"),
    ("--timeout", "-1"),
    ("--concurrency", "0"),
    ("--repeats", "0"),
    ("--max-retries", "-1"),
    ("--repeats", "two"),
  ],
)
def test_numeric_options_are_checked(option, value, capsys):
  with pytest.raises(SystemExit) as e:
    judge_parser().parse_args([*REQUIRED, option, value])
  assert e.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


CANDIDATE = {"id": "a", "images": [], "question": "q?", "reference": "r", "responses": ["x", "y"]}


@pytest.mark.parametrize(
  "change,message",
  [
    ({"responses": "x"}, "'responses' should be a list of strings"),
    ({"responses": ["x", 5]}, "'responses' should be a list of strings"),
    ({"images": [3]}, "'images' should be a list of paths"),
    ({"question": 5}, "'question' should be a string"),
    ({"question": None}, "missing field 'question'"),
    ({"reference": ["r"]}, "'reference' should be a string"),
    ({"id": None}, "'id'"),
    ({"id": 1.5}, "'id'"),
    ({"models": [1, 2]}, "'models' should list one model name"),
  ],
)
def test_bad_candidate_fields(tmp_path, change, message):
  path = tmp_path / "c.jsonl"
  path.write_text(
    json.dumps(CANDIDATE) + "\n" + json.dumps({**CANDIDATE, "id": "b", **change}) + "\n"
  )
  with pytest.raises(UserError, match=f"^{path}:2: .*{message}"):
    read_items(path)


GOOD_JUDGMENT = {
  "id": "a",
  "mode": "listwise",
  "order": [1, 0],
  "raw": "{}",
  "scores": [1.0, 2.0],
  "error": None,
  "judge": "m",
}


@pytest.mark.parametrize(
  "line,message",
  [
    (json.dumps({**GOOD_JUDGMENT, "order": "10"}), "'order'"),
    (json.dumps({**GOOD_JUDGMENT, "id": ["a"]}), "'id'"),
    (json.dumps({**GOOD_JUDGMENT, "scores": [1, "2"]}), "'scores'"),
    (json.dumps({**GOOD_JUDGMENT, "mode": "sideways"}), "'mode'"),
  ],
)
def test_bad_resumed_output(tmp_path, line, message):
  """The output being resumed is an input too: a complete line of the wrong shape is a file:line
  error,
  before any request."""
  inp = tmp_path / "c.jsonl"
  inp.write_text(json.dumps(CANDIDATE) + "\n")
  out = tmp_path / "j.jsonl"
  out.write_text(json.dumps(GOOD_JUDGMENT) + "\n" + line + "\n")
  before = out.read_bytes()
  args = judge_parser().parse_args(
    [
      "--input",
      str(inp),
      "--output",
      str(out),
      "--base-url",
      closed_port_url(),
      "--judge-model",
      "m",
      "--no-progress",
    ]
  )
  with pytest.raises(UserError, match=f"^{out}:2: .*{message}"):
    judge_cli.run(args)
  assert out.read_bytes() == before


@pytest.mark.parametrize(
  "line", [json.dumps({**GOOD_JUDGMENT, "id": "x", "scores": [1, float("nan")]}), "[1, 2]"]
)
def test_unreadable_resumed_line_is_dropped_and_the_rest_kept(tmp_path, line):
  """A complete line that is no record at all (NaN is not JSON) is AppendLog's to repair: dropped
  with a
  warning, the judgments after it kept (they are work done)."""
  inp = tmp_path / "c.jsonl"
  inp.write_text(json.dumps(CANDIDATE) + "\n")
  out = tmp_path / "j.jsonl"
  later = json.dumps({**GOOD_JUDGMENT, "order": [0, 1]})
  out.write_text(json.dumps(GOOD_JUDGMENT) + "\n" + line + "\n" + later + "\n")
  args = judge_parser().parse_args(
    [
      "--input",
      str(inp),
      "--output",
      str(out),
      "--base-url",
      closed_port_url(),
      "--judge-model",
      "m",
      "--no-progress",
      "--max-retries",
      "0",
    ]
  )
  try:
    judge_cli.run(args)
  except UserError:
    pass  # the closed port: whatever is still missing could not be judged
  assert out.read_text() == json.dumps(GOOD_JUDGMENT) + "\n" + later + "\n"


def test_non_utf8_candidates(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_bytes(json.dumps(CANDIDATE).encode() + b"\n" + b'{"id": "b", "question": "\xff"}\n')
  with pytest.raises(UserError, match=f"^{path}:2: "):
    read_items(path)
