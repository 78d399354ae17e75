"""An OpenAI-compatible `/chat/completions` judge client on the `openai` SDK.

Works with vLLM, SGLang and hosted APIs. The SDK carries the requests: connection reuse, retries
of 408/409/429/5xx answers, dropped connections and timeouts with exponential backoff, honouring
`Retry-After` (up to two minutes; its backoff starts at 0.5 s and doubles to 8 s). What is ours:
- unusable answers (unparsable, wrong number of scores, a 200 that is no chat completion) are
  retried here, with `RetryPolicy`'s backoff. One budget of `max_retries` covers both kinds of
  retry: what the SDK spent on a call is not given again.
- after the retries the two kinds of failure part ways: the judge answered, but not usably: that
  is a judgment, recorded with its `error` (DESIGN §7.2: never dropped silently), and done on
  resume (`--retry-failed` redoes it); the judge was never heard (connection refused or reset,
  timeout, HTML or garbage instead of a chat completion, 5xx): nothing is recorded for the job,
  it is counted in the run's summary and asked again by the next run. A run in which no job got
  an answer stops early (the server is not there) and the command exits 1.
- `timeout` bounds each whole HTTP attempt (connect, send, headers, body): the SDK's timeouts
  apply to each socket operation, so a server trickling a byte a second would never trip them.
  The connection pool's sockets are wrapped so every operation gets only what is left of it.
Each finished judgment is appended and fsynced at once (`mrm_jax.io.AppendLog`), so a killed run
resumes with only the missing jobs.

The API key lives only in the SDK's request header: it is never logged, never written, and is
scrubbed from any server text (error bodies, answers) that gets recorded.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import json
import logging
import math
import random
import threading
import time
import urllib.parse
import urllib.request

import httpcore2
import httpx2
import openai
from tqdm import tqdm

from mrm_jax.errors import UserError
from mrm_jax.io import AppendLog
from mrm_jax.judge import prompts
from mrm_jax.judge.jobs import Job, check_done, image_url, missing_jobs
from mrm_jax.judge.parse import parse_scores

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401, 403, 404}  # wrong key / URL / model: every request would fail the same way
MAX_RETRY_AFTER = 600.0
MAX_BODY = 32 << 20  # bytes: a chat completion is far smaller; anything bigger is not one
WRITE_CHUNK = 64 << 10  # request bodies go in pieces, each bounded by what is left of the timeout
# vLLM's convention for "no key": the SDK insists on one, and a server without keys ignores it.
NO_KEY = "EMPTY"


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


class _Stopped(openai.OpenAIError):
  """Raised before an HTTP attempt once the run stops (the SDK passes its own errors on as they
  are, without retrying)."""


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


class _Attempt(threading.local):
  """The HTTP attempt this thread is making: the SDK calls the transport in the caller's thread,
  and a pooled connection serves one request at a time, so its socket operations read this."""

  deadline: float | None = None  # time.monotonic() by which the attempt must end
  received = 0  # bytes read in this attempt
  sent = 0  # attempts started by the current ChatClient.complete()
  stop: threading.Event | None = None


def _time_left(state: _Attempt, timeout: float | None, error: type[Exception]) -> float | None:
  if state.deadline is None:
    return timeout
  left = state.deadline - time.monotonic()
  if left <= 0:
    raise error("the request took longer than its timeout")
  return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore2.NetworkStream):
  """A pooled connection whose every operation is bounded by what is left of the attempt."""

  def __init__(self, stream: httpcore2.NetworkStream, state: _Attempt):
    self._stream, self._state = stream, state

  def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
    data = self._stream.read(max_bytes, _time_left(self._state, timeout, httpcore2.ReadTimeout))
    self._state.received += len(data)
    if self._state.received > MAX_BODY:
      raise httpcore2.ReadError(f"response over {MAX_BODY >> 20} MiB: not a chat completion")
    return data

  def write(self, buffer: bytes, timeout: float | None = None) -> None:
    for start in range(0, len(buffer), WRITE_CHUNK):
      self._stream.write(
        buffer[start : start + WRITE_CHUNK],
        _time_left(self._state, timeout, httpcore2.WriteTimeout),
      )

  def close(self) -> None:
    self._stream.close()

  def start_tls(
    self, ssl_context, server_hostname: str | None = None, timeout: float | None = None
  ) -> httpcore2.NetworkStream:
    tls = self._stream.start_tls(
      ssl_context, server_hostname, _time_left(self._state, timeout, httpcore2.ConnectTimeout)
    )
    return _DeadlineStream(tls, self._state)

  def get_extra_info(self, info: str):
    return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore2.NetworkBackend):
  def __init__(self, backend: httpcore2.NetworkBackend, state: _Attempt):
    self._backend, self._state = backend, state

  def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
    timeout = _time_left(self._state, timeout, httpcore2.ConnectTimeout)
    stream = self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
    return _DeadlineStream(stream, self._state)

  def connect_unix_socket(self, path, timeout=None, socket_options=None):
    timeout = _time_left(self._state, timeout, httpcore2.ConnectTimeout)
    stream = self._backend.connect_unix_socket(path, timeout, socket_options)
    return _DeadlineStream(stream, self._state)

  def sleep(self, seconds: float) -> None:
    self._backend.sleep(seconds)


class ChatClient:
  """One `/chat/completions` endpoint. Thread-safe: the SDK client and its connection pool are
  shared; each thread's attempt state is its own."""

  def __init__(
    self,
    base_url: str,
    model: str,
    api_key: str | None = None,
    timeout: float = 120.0,
    temperature: float | None = 0.0,
    max_tokens: int | None = None,
  ):
    url = base_url.rstrip("/")
    self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    self.model = model
    self._key = api_key or None
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
      raise UserError(f"the judge timeout must be a finite number of seconds > 0, got {timeout!r}")
    self.timeout = float(timeout)
    self._options = {}
    if temperature is not None:
      self._options["temperature"] = temperature
    if max_tokens:
      self._options["max_tokens"] = max_tokens
    self._state = _Attempt()
    transport = httpx2.HTTPTransport(proxy=_proxy_for(self.url))
    pool = transport._pool  # noqa: SLF001 - httpx2 takes no network backend: set it on its pool
    pool._network_backend = _DeadlineBackend(pool._network_backend, self._state)  # noqa: SLF001
    http = openai.DefaultHttpxClient(
      transport=transport, event_hooks={"request": [self._start_attempt]}
    )
    self._sdk = openai.OpenAI(
      base_url=self.url.removesuffix("/chat/completions"),
      api_key=self._key or NO_KEY,
      max_retries=0,
      timeout=self.timeout,
      http_client=http,
    )
    self._with_retries: dict[int, openai.OpenAI] = {0: self._sdk}

  def redact(self, text: str) -> str:
    return text.replace(self._key, "***") if self._key and text else text

  @property
  def attempts(self) -> int:
    """HTTP attempts made by this thread's last `complete` (the SDK's retries included)."""
    return self._state.sent

  def _start_attempt(self, request) -> None:
    """httpx2's request hook, once per HTTP attempt, in the thread making it."""
    state = self._state
    if state.stop is not None and state.stop.is_set():
      raise _Stopped("the run stopped")
    state.sent += 1
    state.received = 0
    state.deadline = time.monotonic() + self.timeout

  def complete(
    self, messages: list[dict], retries: int = 0, stop: threading.Event | None = None
  ) -> str:
    """The judge's answer; the SDK retries transient failures up to `retries` times, and makes no
    new attempt once `stop` is set."""
    sdk = self._with_retries.get(retries)
    if sdk is None:
      sdk = self._with_retries.setdefault(retries, self._sdk.with_options(max_retries=retries))
    state = self._state
    state.sent, state.stop = 0, stop
    try:
      response = sdk.chat.completions.with_raw_response.create(
        model=self.model, messages=messages, **self._options
      )
      payload = response.http_response.content
    except openai.APIStatusError as e:
      raise self._status_error(e.status_code, e.response) from None
    except openai.APITimeoutError:
      raise RetryableError(f"timed out after {self.timeout:g}s") from None
    except openai.APIConnectionError as e:  # it may quote the server
      raise RetryableError(self.redact(f"connection error: {e.__cause__ or e}")) from None
    except _Stopped:
      raise RetryableError("the run stopped") from None
    except openai.OpenAIError as e:  # anything else the SDK refuses: not an answer either
      raise RetryableError(self.redact(f"{type(e).__name__}: {e}")) from None
    finally:
      state.deadline, state.stop = None, None
    return self.redact(_content(payload))

  def _status_error(self, status: int, response: httpx2.Response) -> Exception:
    """A refusal as RetryableError / PermanentError / FatalError."""
    try:
      detail = self.redact(response.content[:500].decode("utf-8", "replace"))
      detail = detail.strip().replace("\n", " ")
    except Exception:  # noqa: BLE001 - the body of an error is best effort
      detail = ""
    message = f"HTTP {status}" + (f": {detail[:200]}" if detail else "")
    if status in RETRYABLE_STATUS or status >= 500:
      return RetryableError(message, parse_retry_after(response.headers.get("Retry-After")))
    if status in FATAL_STATUS:
      return FatalError(f"the judge server at {self.url} refused the request ({message})")
    return PermanentError(message)


def _content(payload: bytes) -> str:
  """The answer text of a chat-completions response body; RetryableError if it is none."""
  try:
    content = json.loads(payload)["choices"][0]["message"]["content"]
    if isinstance(content, list):  # content parts
      content = "".join(
        p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
      )
    if not isinstance(content, (str, type(None))):
      raise TypeError(type(content).__name__)
  except (ValueError, KeyError, IndexError, TypeError, RecursionError):
    start = payload[:200].decode("utf-8", "replace")
    raise RetryableError(f"not a chat completion: {start!r}") from None
  return content or ""


def _is_loopback(url: str) -> bool:
  host = urllib.parse.urlsplit(url).hostname or ""
  return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def _proxy_for(url: str) -> str | None:
  """The environment's proxy for `url` (HTTP(S)_PROXY, NO_PROXY), none for the loopback (a local
  vLLM/SGLang). Ours to find: httpx2 ignores the environment once given a transport."""
  parts = urllib.parse.urlsplit(url)
  if _is_loopback(url) or urllib.request.proxy_bypass(parts.hostname or ""):
    return None
  proxy = urllib.request.getproxies().get(parts.scheme)
  return proxy if not proxy or "://" in proxy else f"http://{proxy}"


@dataclasses.dataclass
class RetryPolicy:
  max_retries: int = 5  # HTTP attempts per job beyond the first, the SDK's included
  backoff: float = 1.0  # first delay in seconds before asking again after an unusable answer
  max_backoff: float = 60.0

  def delay(self, attempt: int, rng: random.Random) -> float:
    base = min(self.max_backoff, self.backoff * (2**attempt))
    return base * (1.0 + 0.25 * rng.random())  # jitter spreads concurrent retries


def judge_one(
  client: ChatClient,
  job: Job,
  mode: str,
  policy: RetryPolicy,
  stop: threading.Event | None = None,
  creativity: bool = False,
) -> dict | None:
  """Asks the judge about one job until it answers usably or the retries run out.

  Returns the judgment record of DESIGN §3.2 (scores in presentation order; a failed judgment has
  `scores` None and `error` set), None when `stop` was set before the job finished, and raises
  NotReached when the last attempt failed before the judge answered (nothing to record).
  """
  stop = stop or threading.Event()
  item = job.item
  shown = [item.responses[i] for i in job.order]
  messages = prompts.build_messages(
    mode, item.question, shown, [image_url(p) for p in item.images], item.reference, creativity
  )
  rng = random.Random()
  raw, error, reached = "", None, False
  attempts, wait = 0, 0.0
  while not stop.wait(wait):
    try:
      answer = client.complete(messages, policy.max_retries - attempts, stop)
    except RetryableError as e:
      error, reached = str(e), False
      wait = e.retry_after
    except PermanentError as e:
      error, reached = (
        str(e),
        True,
      )  # the server read the request and refused it: asking again is futile
      attempts += max(1, client.attempts)
      break
    else:
      parsed = parse_scores(answer, len(job.order), mode)
      if parsed.ok:
        return _record(job, mode, answer, parsed.scores, None, client.model)
      raw, error, reached = answer, f"unusable answer: {parsed.error}", True
      wait = None
    attempts += max(1, client.attempts)
    log.debug("job %s %s attempt %d failed: %s", item.id, list(job.order), attempts, error)
    if attempts > policy.max_retries:
      break
    if wait is None:
      wait = policy.delay(attempts - 1, rng)
  if stop.is_set():
    return None
  error = f"{error} (after {attempts} attempt{'s' * (attempts != 1)})"
  if not reached:
    raise NotReached(error)
  return _record(job, mode, raw, None, error, client.model)


def _record(job: Job, mode: str, raw: str, scores, error, judge: str) -> dict:
  return {
    "id": job.item.id,
    "mode": mode,
    "order": list(job.order),
    "raw": raw,
    "scores": scores,
    "error": error,
    "judge": judge,
  }


@dataclasses.dataclass
class RunSummary:
  planned: int
  already_done: int
  ok: int = 0
  failed: int = 0  # judgments recorded with an error (the judge answered, not usably)
  not_reached: int = 0  # jobs that never got an answer: not recorded, asked again by the next run
  unfinished: int = (
    0  # jobs left (or cut short) when the run stopped early: nothing had been answered
  )
  first_error: str | None = None  # of the first job not reached

  @property
  def unreachable(self) -> bool:
    """Jobs ran, and not one got an answer from the judge."""
    return self.not_reached > 0 and self.ok == 0 and self.failed == 0


def run_jobs(
  client: ChatClient,
  jobs: list[Job],
  output,
  mode: str,
  policy: RetryPolicy,
  concurrency: int = 8,
  retry_failed: bool = False,
  creativity: bool = False,
  progress: bool = True,
) -> RunSummary:
  """Runs the jobs not yet in `output`, appending each judgment as soon as it is done.

  Jobs the judge never answered are counted in the summary, not written (a rerun asks them again).
  Once max(UNREACHABLE_AFTER, concurrency) of them failed with nothing answered, the rest are not
  started: the summary is then `unreachable`.
  """

  with AppendLog(output) as out:
    check_done(output)
    other_judges = {r.get("judge") for r in out.records} - {client.model, None}
    if other_judges:
      log.warning(
        "%s already holds judgments by %s; they count as done", output, sorted(other_judges)
      )
    todo = missing_jobs(jobs, out.records, mode, retry_failed)
    summary = RunSummary(planned=len(jobs), already_done=len(jobs) - len(todo))
    if not todo:
      return summary
    give_up_after = max(UNREACHABLE_AFTER, concurrency)
    stop = threading.Event()
    bar = tqdm(
      total=len(todo), desc=f"judge {mode}", unit="job", disable=not progress, dynamic_ncols=True
    )
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
      futures = [
        pool.submit(judge_one, client, job, mode, policy, stop, creativity) for job in todo
      ]
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
        bar.set_postfix(
          ok=summary.ok, failed=summary.failed, not_reached=summary.not_reached, refresh=False
        )
    except BaseException:
      stop.set()
      pool.shutdown(wait=False, cancel_futures=True)
      raise
    finally:
      bar.close()
    pool.shutdown(wait=True)
  summary.unfinished = len(todo) - summary.ok - summary.failed - summary.not_reached
  return summary
