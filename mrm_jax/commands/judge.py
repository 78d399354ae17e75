"""`mrm-jax judge`: ask an OpenAI-compatible judge to score candidate responses."""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse

from mrm_jax.cli_types import nonnegative_float, nonnegative_int, positive_float, positive_int
from mrm_jax.errors import UserError

EXIT_UNREACHABLE = 1  # not a usage error (2): the judge could not be reached


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.description = (
    "Score candidate responses with an OpenAI-compatible judge (vLLM, SGLang, hosted APIs). "
    "Each item is shown --repeats times, each time in a seeded random order that differs from the "
    "stored one (pairwise: the orders [0,1] and [1,0]). Judgments are appended as they finish, so "
    "re-running the same command resumes where a killed run stopped. Input: candidate sets "
    "{id, images, question, reference?, responses} or preference pairs (a re-annotation queue; "
    "stored responses are [chosen, rejected])."
  )
  p.add_argument("--input", required=True, help="candidate sets or pairs (JSONL or a JSON list)")
  p.add_argument("--output", required=True, help="judgments JSONL; appended to and resumed from")
  p.add_argument(
    "--mode",
    choices=("listwise", "pointwise", "pairwise"),
    default="listwise",
    help="listwise: all responses at once; pointwise: one at a time; pairwise: two (default: "
    "listwise)",
  )
  p.add_argument(
    "--base-url",
    required=True,
    help="API base URL, e.g. http://localhost:8000/v1 (/chat/completions is appended)",
  )
  p.add_argument(
    "--judge-model", required=True, help="model name sent to the server and stored in 'judge'"
  )
  p.add_argument(
    "--api-key-env",
    default=None,
    metavar="VAR",
    help="name of the environment variable holding the API key (never logged or written)",
  )
  p.add_argument(
    "--repeats",
    type=positive_int,
    default=2,
    metavar="K",
    help="presentations per item (default 2)",
  )
  p.add_argument(
    "--concurrency", type=positive_int, default=8, metavar="N", help="parallel requests (default 8)"
  )
  p.add_argument(
    "--max-retries",
    type=nonnegative_int,
    default=5,
    metavar="R",
    help="retries per job on transient errors and unusable answers (default 5)",
  )
  p.add_argument(
    "--timeout",
    type=positive_float,
    default=120.0,
    metavar="T",
    help="seconds a whole request may take, connect to last byte (default 120)",
  )
  p.add_argument(
    "--backoff",
    type=nonnegative_float,
    default=1.0,
    help="first delay before retrying an unusable answer, doubled per attempt (default 1); "
    "HTTP errors, 429 and timeouts are retried by the openai SDK (0.5 s doubling to 8 s, "
    "Retry-After honoured)",
  )
  p.add_argument(
    "--max-backoff",
    type=nonnegative_float,
    default=60.0,
    help="cap on the delay before retrying an unusable answer (default 60)",
  )
  p.add_argument(
    "--image-root",
    default=None,
    help="folder image paths are relative to (default: the input's folder)",
  )
  p.add_argument("--seed", type=int, default=0, help="seed of the presentation orders (default 0)")
  p.add_argument(
    "--temperature", type=nonnegative_float, default=0.0, help="sampling temperature (default 0)"
  )
  p.add_argument(
    "--max-tokens",
    type=positive_int,
    default=None,
    help="max answer tokens (default: the server's)",
  )
  p.add_argument("--creativity", action="store_true", help="also ask for a creativity score")
  p.add_argument(
    "--retry-failed",
    action="store_true",
    help="on resume, redo jobs whose recorded judgment failed (the failure stays in the file)",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
  from mrm_jax.judge.client import ChatClient, RetryPolicy, run_jobs
  from mrm_jax.judge.jobs import plan_jobs, read_items

  if not args.base_url.startswith(("http://", "https://")):
    raise UserError(f"--base-url must start with http:// or https:// (got '{args.base_url}')")
  if "@" in urllib.parse.urlsplit(args.base_url).netloc:
    raise UserError(
      "--base-url must not hold credentials (user:password@): pass the key with --api-key-env"
    )
  api_key = None
  if args.api_key_env:
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
      raise UserError(
        f"environment variable {args.api_key_env} (from --api-key-env) is not set or empty"
      )

  from mrm_jax.io import check_distinct_paths

  check_distinct_paths(
    {"--output": args.output}, {"--input": args.input}
  )  # judgments would be appended to it
  items = read_items(args.input, args.image_root)
  jobs, skipped = plan_jobs(items, args.mode, args.repeats, args.seed)
  if skipped:
    print(
      f"judge: skipped {len(skipped)} candidate set(s) with fewer than two distinct responses",
      file=sys.stderr,
    )
  client = ChatClient(
    args.base_url,
    args.judge_model,
    api_key,
    timeout=args.timeout,
    temperature=args.temperature,
    max_tokens=args.max_tokens,
  )
  policy = RetryPolicy(args.max_retries, args.backoff, args.max_backoff)
  summary = run_jobs(
    client,
    jobs,
    args.output,
    args.mode,
    policy,
    concurrency=args.concurrency,
    retry_failed=args.retry_failed,
    creativity=args.creativity,
    progress=not args.no_progress,
  )
  print(
    f"judge: {summary.planned} jobs for {len(items) - len(skipped)} items; {summary.already_done} "
    "already "
    f"done, {summary.ok} judged, {summary.failed} failed after retries (recorded with 'error'), "
    f"{summary.not_reached + summary.unfinished} not judged -> {args.output}"
  )
  if summary.unreachable:
    print(
      client.redact(
        f"mrm-jax judge: error: could not reach the judge at {client.url}: no job got an "
        f"answer ({summary.not_reached} tried; first error: {summary.first_error}); nothing "
        "was recorded, run the same command again to retry"
      ),
      file=sys.stderr,
    )
    return EXIT_UNREACHABLE
  if summary.not_reached:
    print(
      client.redact(
        f"judge: {summary.not_reached} job(s) got no answer from the judge at {client.url} "
        f"(first error: {summary.first_error}); not recorded: run the same command again "
        "to ask them again"
      ),
      file=sys.stderr,
    )
  return 0
