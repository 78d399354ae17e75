"""An OpenAI-compatible `/chat/completions` judge client on the standard library only.

Works with vLLM, SGLang and hosted APIs. Transient failures (429, 5xx, timeouts, dropped
connections) and unusable answers (unparsable, wrong number of scores) are retried with
exponential backoff, honouring `Retry-After`. After R retries the two kinds part ways:
- the judge answered, but not usably: that is a judgment, recorded with its `error` (DESIGN §7.2:
  never dropped silently), and done on resume (`--retry-failed` redoes it);
- the judge was never heard (connection refused or reset, timeout, HTML or garbage instead of a
  chat completion, 5xx): nothing is recorded for the job, it is counted in the run's summary and
  asked again by the next run. A run in which no job got an answer stops early (the server is
  not there) and the command exits 1.
Each finished judgment is appended and fsynced at once (`mrm_jax.io.AppendLog`), so a killed run
resumes with only the missing jobs.

`timeout` bounds a whole request (connect, send, headers, body): urllib's own timeout applies to
each socket operation, so a server trickling a byte a second would never trip it.

The API key lives only in the request header: it is never logged, never written, and is
scrubbed from any server text (error bodies, answers) that gets recorded.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import http.client
import json
import logging
import math
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from mrm_jax.errors import UserError
from mrm_jax.judge import prompts
from mrm_jax.judge.jobs import Job, check_done, image_url, missing_jobs
from mrm_jax.judge.parse import parse_scores
from mrm_jax.io import AppendLog

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401, 403, 404}  # wrong key / URL / model: every request would fail the same way
MAX_RETRY_AFTER = 600.0
MAX_BODY = 32 << 20  # bytes: a chat completion is far smaller; anything bigger is not one


class RetryableError(Exception):
  def __init__(self, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.retry_after = retry_after


class PermanentError(Exception):
  """This request cannot succeed (e.g. 400: the prompt is too long); other jobs may."""


class FatalError(UserError):
  """No request can succeed (bad key, URL or model name): the run stops."""


class NotReached(Exception):
  """A job whose every attempt failed before the judge answered (RetryableError): no judgment."""


# A run stops once this many jobs (or `concurrency`, if more) failed that way while none had been
# answered: the server is not there. More than one, so that one oversized request is not taken
# for a dead server.
UNREACHABLE_AFTER = 3


def parse_retry_after(value: str | None) -> float | None:
  """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
  if not value:
    return None
  value = value.strip()
  try:
    seconds = float(value)
  except ValueError:
    try:
      when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
      return None
    seconds = when.timestamp() - time.time()
  return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class _Deadline:
  """Ends a request `seconds` after it starts, whatever it is doing: when the time is up, the
  request's sockets are shut down, which wakes a read (or send) blocked on the server."""

  def __init__(self, seconds: float):
    self.expired = False
    self._lock = threading.Lock()
    self._sockets: list[socket.socket] = []
    self._timer = threading.Timer(seconds, self._expire)
    self._timer.daemon = True

  def __enter__(self):
    self._timer.start()
    return self

  def __exit__(self, *exc):
    self._timer.cancel()

  def _expire(self) -> None:
    with self._lock:
      self.expired = True
      sockets = list(self._sockets)
    for sock in sockets:
      _shutdown(sock)

  def watch(self, sock: socket.socket) -> socket.socket:
    with self._lock:
      self._sockets.append(sock)
      expired = self.expired
    if expired:
      _shutdown(sock)
    return sock

  def connection_factory(self, http_class):
    """`http_class` whose sockets are watched: the plain one while connecting (to the server or a
    proxy), then the connected one (under TLS a new object: wrapping detaches the plain socket)."""
    def make(*args, **kwargs):
      conn = http_class(*args, **kwargs)
      create, connect = conn._create_connection, conn.connect  # noqa: SLF001 - http.client's socket hook

      def connect_watched():
        connect()
        self.watch(conn.sock)

      conn._create_connection = lambda *a, **kw: self.watch(create(*a, **kw))  # noqa: SLF001
      conn.connect = connect_watched
      return conn
    return make


def _shutdown(sock: socket.socket) -> None:
  try:  # the plain socket's shutdown, also under TLS: it acts on the file descriptor
    socket.socket.shutdown(sock, socket.SHUT_RDWR)
  except OSError:
    pass  # already closed


class _DeadlineHandler:
  """Mixin for urllib's HTTP(S) handlers: their connections are watched by `deadline`."""

  def __init__(self, deadline: _Deadline, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.deadline = deadline

  def do_open(self, http_class, req, **kwargs):
    return super().do_open(self.deadline.connection_factory(http_class), req, **kwargs)


class _HTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
  pass


class _HTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
  pass


class ChatClient:
  """One `/chat/completions` endpoint. Thread-safe: every call opens its own connection."""

  def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
               temperature: float | None = 0.0, max_tokens: int | None = None):
    url = base_url.rstrip("/")
    self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    self.model = model
    self._key = api_key or None
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
      raise UserError(f"the judge timeout must be a finite number of seconds > 0, got {timeout!r}")
    self.timeout = float(timeout)
    self.temperature = temperature
    self.max_tokens = max_tokens
    # Proxies from the environment apply, except for the loopback (local vLLM/SGLang).
    self._proxies = {} if _is_loopback(self.url) else None

  def _opener(self, deadline: _Deadline):
    return urllib.request.build_opener(urllib.request.ProxyHandler(self._proxies), _HTTPHandler(deadline),
                                       _HTTPSHandler(deadline))

  def redact(self, text: str) -> str:
    return text.replace(self._key, "***") if self._key and text else text

  def complete(self, messages: list[dict]) -> str:
    body = {"model": self.model, "messages": messages}
    if self.temperature is not None:
      body["temperature"] = self.temperature
    if self.max_tokens:
      body["max_tokens"] = self.max_tokens
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self._key:
      headers["Authorization"] = f"Bearer {self._key}"
    request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                     method="POST")
    with _Deadline(self.timeout) as deadline:
      try:
        return self.redact(_content(self._post(request, deadline)))
      except RetryableError as e:
        if deadline.expired:  # whatever broke when the sockets were shut, the cause is the deadline
          raise RetryableError(f"timed out after {self.timeout:g}s") from None
        raise RetryableError(self.redact(str(e)), e.retry_after) from None  # it may quote the server

  def _post(self, request: urllib.request.Request, deadline: _Deadline) -> bytes:
    """The response body, or the failure as RetryableError / PermanentError / FatalError."""
    try:
      with self._opener(deadline).open(request, timeout=self.timeout) as response:
        payload = response.read(MAX_BODY + 1)
    except urllib.error.HTTPError as e:
      status = e.code
      try:
        detail = self.redact(e.read(500).decode("utf-8", "replace")).strip().replace("\n", " ")
      except Exception:  # noqa: BLE001 - the body of an error is best effort
        detail = ""
      message = f"HTTP {status}" + (f": {detail[:200]}" if detail else "")
      if status in RETRYABLE_STATUS or status >= 500:
        raise RetryableError(message, parse_retry_after(e.headers.get("Retry-After"))) from None
      if status in FATAL_STATUS:
        raise FatalError(f"the judge server at {self.url} refused the request ({message})") from None
      raise PermanentError(message) from None
    except (TimeoutError, socket.timeout):
      raise RetryableError(f"timed out after {self.timeout:g}s") from None
    except urllib.error.URLError as e:
      reason = e.reason
      if isinstance(reason, (TimeoutError, socket.timeout)):
        raise RetryableError(f"timed out after {self.timeout:g}s") from None
      raise RetryableError(f"connection error: {reason}") from None
    except (http.client.HTTPException, ConnectionError, OSError) as e:
      raise RetryableError(f"connection error: {type(e).__name__}: {e}") from None
    if len(payload) > MAX_BODY:
      raise RetryableError(f"response body over {MAX_BODY >> 20} MiB: not a chat completion")
    return payload


def _content(payload: bytes) -> str:
  """The answer text of a chat-completions response body; RetryableError if it is none."""
  try:
    content = json.loads(payload)["choices"][0]["message"]["content"]
    if isinstance(content, list):  # content parts
      content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if not isinstance(content, (str, type(None))):
      raise TypeError(type(content).__name__)
  except (ValueError, KeyError, IndexError, TypeError, RecursionError):
    raise RetryableError(f"not a chat completion: {payload[:200].decode('utf-8', 'replace')!r}") from None
  return content or ""


def _is_loopback(url: str) -> bool:
  host = urllib.parse.urlsplit(url).hostname or ""
  return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


@dataclasses.dataclass
class RetryPolicy:
  max_retries: int = 5
  backoff: float = 1.0  # first delay in seconds; doubles per attempt
  max_backoff: float = 60.0

  def delay(self, attempt: int, rng: random.Random) -> float:
    base = min(self.max_backoff, self.backoff * (2 ** attempt))
    return base * (1.0 + 0.25 * rng.random())  # jitter spreads concurrent retries


def judge_one(client: ChatClient, job: Job, mode: str, policy: RetryPolicy,
              stop: threading.Event | None = None, creativity: bool = False) -> dict | None:
  """Asks the judge about one job until it answers usably or the retries run out.

  Returns the judgment record of DESIGN §3.2 (scores in presentation order; a failed judgment has
  `scores` None and `error` set), None when `stop` was set before the job finished, and raises
  NotReached when the last attempt failed before the judge answered (nothing to record).
  """
  stop = stop or threading.Event()
  item = job.item
  shown = [item.responses[i] for i in job.order]
  messages = prompts.build_messages(mode, item.question, shown, [image_url(p) for p in item.images],
                                    item.reference, creativity)
  rng = random.Random()
  raw, error, reached = "", None, False
  attempts = 0
  for attempt in range(policy.max_retries + 1):
    if stop.is_set():
      return None
    attempts += 1
    try:
      answer = client.complete(messages)
    except RetryableError as e:
      error, reached = str(e), False
      wait = e.retry_after if e.retry_after is not None else policy.delay(attempt, rng)
    except PermanentError as e:
      error, reached = str(e), True  # the server read the request and refused it: asking again is futile
      break
    else:
      parsed = parse_scores(answer, len(job.order), mode)
      if parsed.ok:
        return _record(job, mode, answer, parsed.scores, None, client.model)
      raw, error, reached = answer, f"unusable answer: {parsed.error}", True
      wait = policy.delay(attempt, rng)
    log.debug("job %s %s attempt %d failed: %s", item.id, list(job.order), attempt + 1, error)
    if attempt < policy.max_retries:
      stop.wait(wait)
  if stop.is_set():
    return None
  error = f"{error} (after {attempts} attempt{'s' * (attempts != 1)})"
  if not reached:
    raise NotReached(error)
  return _record(job, mode, raw, None, error, client.model)


def _record(job: Job, mode: str, raw: str, scores, error, judge: str) -> dict:
  return {"id": job.item.id, "mode": mode, "order": list(job.order), "raw": raw, "scores": scores,
          "error": error, "judge": judge}


@dataclasses.dataclass
class RunSummary:
  planned: int
  already_done: int
  ok: int = 0
  failed: int = 0       # judgments recorded with an error (the judge answered, not usably)
  not_reached: int = 0  # jobs that never got an answer: not recorded, asked again by the next run
  unfinished: int = 0   # jobs left (or cut short) when the run stopped early: nothing had been answered
  first_error: str | None = None  # of the first job not reached

  @property
  def unreachable(self) -> bool:
    """Jobs ran, and not one got an answer from the judge."""
    return self.not_reached > 0 and self.ok == 0 and self.failed == 0


def run_jobs(client: ChatClient, jobs: list[Job], output, mode: str, policy: RetryPolicy,
             concurrency: int = 8, retry_failed: bool = False, creativity: bool = False,
             progress: bool = True) -> RunSummary:
  """Runs the jobs not yet in `output`, appending each judgment as soon as it is done.

  Jobs the judge never answered are counted in the summary, not written (a rerun asks them again).
  Once max(UNREACHABLE_AFTER, concurrency) of them failed with nothing answered, the rest are not
  started: the summary is then `unreachable`.
  """
  from tqdm import tqdm

  with AppendLog(output) as out:
    check_done(output)
    other_judges = {r.get("judge") for r in out.records} - {client.model, None}
    if other_judges:
      log.warning("%s already holds judgments by %s; they count as done", output, sorted(other_judges))
    todo = missing_jobs(jobs, out.records, mode, retry_failed)
    summary = RunSummary(planned=len(jobs), already_done=len(jobs) - len(todo))
    if not todo:
      return summary
    give_up_after = max(UNREACHABLE_AFTER, concurrency)
    stop = threading.Event()
    bar = tqdm(total=len(todo), desc=f"judge {mode}", unit="job", disable=not progress, dynamic_ncols=True)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
      futures = [pool.submit(judge_one, client, job, mode, policy, stop, creativity) for job in todo]
      for future in concurrent.futures.as_completed(futures):
        if future.cancelled():
          continue
        try:
          record = future.result()
        except NotReached as e:
          summary.not_reached += 1
          summary.first_error = summary.first_error or str(e)
          if summary.unreachable and summary.not_reached >= give_up_after and not stop.is_set():
            stop.set()  # the server is not there: asking the rest would only take longer
            for f in futures:
              f.cancel()
          record = None
        if record is not None:
          out.append(record)
          if record["scores"] is None:
            summary.failed += 1
          else:
            summary.ok += 1
        bar.update(1)
        bar.set_postfix(ok=summary.ok, failed=summary.failed, not_reached=summary.not_reached, refresh=False)
    except BaseException:
      stop.set()
      pool.shutdown(wait=False, cancel_futures=True)
      raise
    finally:
      bar.close()
    pool.shutdown(wait=True)
  summary.unfinished = len(todo) - summary.ok - summary.failed - summary.not_reached
  return summary
