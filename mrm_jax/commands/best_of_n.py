"""`mrm-jax best-of-n`: pick the highest-reward response of each candidate set (see
`mrm_jax.evaluate.best_of_n`)."""

from __future__ import annotations

from pathlib import Path

from mrm_jax.cli_types import add_processing_arguments, positive_int
from mrm_jax.errors import UserError
from mrm_jax.evaluate.best_of_n import check_images, read_candidates, select
from mrm_jax.io import check_distinct_paths, write_jsonl


def add_arguments(parser) -> None:
  parser.add_argument(
    "--model",
    required=True,
    metavar="DIR",
    help="reward model (HF-format directory or training workdir)",
  )
  parser.add_argument(
    "--input",
    required=True,
    metavar="CANDIDATES.jsonl",
    help='candidate sets: {"id", "images", "question", "responses": [...]}',
  )
  parser.add_argument(
    "--output",
    required=True,
    metavar="OUT.jsonl",
    help='each candidate set plus "scores", "best" (index) and "best_response"',
  )
  parser.add_argument(
    "--image-root",
    metavar="DIR",
    help="folder image paths are relative to (default: the input's folder)",
  )
  parser.add_argument(
    "--batch-size", type=positive_int, default=8, help="scoring records per batch (default 8)"
  )
  parser.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="compute dtype (default float32; parameters load in float32)",
  )
  add_processing_arguments(parser)


def run(args) -> int:
  check_distinct_paths({"--output": args.output}, {"--input": args.input})
  cands = read_candidates(args.input)
  if not cands:
    raise UserError(f"{args.input}: no candidate sets")
  image_root = Path(args.image_root) if args.image_root else Path(args.input).resolve().parent
  check_images(cands, image_root)

  from mrm_jax.evaluate.scoring import score_records  # jax loads only when the command runs
  from mrm_jax.loading import load_model

  model, processor = load_model(
    args.model, dtype=args.dtype, image_preprocess=args.image_preprocess, template=args.template
  )
  # record k of the flattened list belongs to the candidate set at `owner[k]`, for error messages
  owner = [where for where, c in cands for _ in c["responses"]]
  out = select(
    [c for _, c in cands],
    lambda recs: score_records(
      model,
      processor,
      recs,
      image_root,
      args.batch_size,
      where=lambda i: f"{owner[i]} (response {recs[i]['id'].rsplit(':', 1)[-1]})",
    ),
  )
  write_jsonl(args.output, out)
  n_resp = sum(len(c["responses"]) for c in out)
  print(f"best-of-n: scored {n_resp} responses of {len(out)} candidate sets; wrote {args.output}")
  return 0
