"""The judge's transport is the openai SDK: its retries and Retry-After, counted in our budget;
our whole-request timeout and stop on top. And config overrides follow ml_collections' rules."""

import http.server
import json
import threading
import time

import openai
import pytest

from mrm_jax import config as config_lib
from mrm_jax.errors import UserError
from mrm_jax.judge.client import ChatClient, RetryableError

KEY = "sk-sdk-test-5a1f"
HELLO = [{"role": "user", "content": "hello"}]


class Scripted:
  """Answers POSTs with the scripted statuses in turn (then 200 with a chat completion)."""

  def __init__(self, script):
    self.script, self.seen = list(script), []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *a):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.seen.append((time.monotonic(), self.headers.get("Authorization"), body))
        status, headers = server.script.pop(0) if server.script else (200, {})
        echo = {"error": {"message": f"no ({self.headers.get('Authorization')})"}}
        ok = {"choices": [{"message": {"content": "fine"}}]}
        data = json.dumps(ok if status == 200 else echo).encode()
        self.send_response(status)
        for k, v in headers.items():
          self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def test_the_sdk_carries_the_request_with_our_timeout_and_no_retries_by_default():
  client = ChatClient(
    "http://127.0.0.1:1/v1/chat/completions", "m", KEY, timeout=3.5, temperature=0.0, max_tokens=9
  )
  assert isinstance(client._sdk, openai.OpenAI) and client._sdk.max_retries == 0
  assert client._sdk.timeout == 3.5 and str(client._sdk.base_url) == "http://127.0.0.1:1/v1/"


def test_sdk_retries_429_with_retry_after_then_500_and_counts_every_attempt():
  server = Scripted([(429, {"Retry-After": "0.3"}), (500, {})])
  try:
    client = ChatClient(server.url, "judge-m", KEY, timeout=2.0, max_tokens=7)
    assert client.complete(HELLO, retries=2) == "fine" and client.attempts == 3
    (t0, auth, body), (t1, _, _), _ = server.seen
    assert t1 - t0 >= 0.29  # the server's Retry-After, not the SDK's own backoff
    assert auth == f"Bearer {KEY}" and body["model"] == "judge-m" and body["max_tokens"] == 7
    assert body["temperature"] == 0.0 and body["messages"] == HELLO
    # Out of retries: the last failure, the key the server echoed scrubbed.
    server.script = [(500, {}), (503, {})]
    with pytest.raises(RetryableError, match=r"HTTP 503") as e:
      client.complete(HELLO, retries=1)
    assert client.attempts == 2 and KEY not in str(e.value) and "***" in str(e.value)
  finally:
    server.close()


def test_no_key_sends_none_of_the_environments(monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
  server = Scripted([])
  try:
    assert ChatClient(server.url, "m").complete(HELLO) == "fine"
    assert server.seen[0][1] == "Bearer EMPTY"
  finally:
    server.close()


def test_a_stopped_run_sends_nothing():
  server = Scripted([])
  try:
    stop = threading.Event()
    stop.set()
    with pytest.raises(RetryableError, match="stopped"):
      ChatClient(server.url, "m", timeout=1.0).complete(HELLO, retries=3, stop=stop)
    assert server.seen == []
  finally:
    server.close()


@pytest.mark.parametrize(
  "override,message",
  [
    ("train.num_steps=2.5", "--config.train.num_steps: expected an integer, got '2.5'"),
    ("model.freeze_vision=maybe", "--config.model.freeze_vision: expected true or false"),
    ("train.learning_rate=fast", "--config.train.learning_rate: expected a number, got 'fast'"),
  ],
)
def test_overrides_follow_ml_collections_types(override, message):
  with pytest.raises(UserError) as e:
    config_lib.apply_overrides(config_lib.base_config(), [f"--config.{override}"])
  assert str(e.value).startswith(message) and "\n" not in str(e.value)
  cfg = config_lib.apply_overrides(
    config_lib.base_config(),
    [
      "--config.train.learning_rate=1",
      "--config.data.seq_buckets=64,128",
      "--config.model.freeze_vision",
      "0",
    ],
  )
  assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
  assert cfg.data.seq_buckets == (64, 128) and cfg.model.freeze_vision is False
