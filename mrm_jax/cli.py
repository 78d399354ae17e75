"""The `mrm-jax` command.

Each subcommand is a module of `mrm_jax.commands` exposing `add_arguments(parser)` and
`run(args) -> int | None`. Modules are imported only when
their command runs (or its --help is asked for), so `mrm-jax --help` stays instant and a
heavy dependency of one command never slows another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mrm_jax import __version__, console
from mrm_jax.errors import UserError

# name -> (module, one-line help). Register a command only when it works.
COMMANDS: dict[str, tuple[str, str]] = {
  "demo": (
    "mrm_jax.commands.demo",
    "the whole pipeline on the embedded synthetic world (CPU, minutes)",
  ),
  "score": ("mrm_jax.commands.score", "score every record of a JSONL file with a reward model"),
  "export": (
    "mrm_jax.commands.export",
    "write a reward model as an HF directory (+ value_head.safetensors)",
  ),
  "train": (
    "mrm_jax.commands.train",
    "train a reward model on a device mesh; resumes from the workdir's checkpoints",
  ),
  "judge": (
    "mrm_jax.commands.judge",
    "score candidate responses with an OpenAI-compatible judge (resumable)",
  ),
  "construct": (
    "mrm_jax.commands.construct",
    "debiased preference pairs from judged candidate sets, with a style-bias report",
  ),
  "t2i": (
    "mrm_jax.commands.t2i",
    "T2I preferences -> position-balanced two-image reward-model pairs",
  ),
  "convert": (
    "mrm_jax.commands.convert",
    "native dataset (RLAIF-V, VLFeedback, Pick-a-Pic, benchmarks, ...) -> preference pairs",
  ),
  "evaluate": (
    "mrm_jax.commands.evaluate",
    "benchmark metrics (VL-RewardBench, Multimodal RewardBench, MM-RLHF-RewardBench, pairs) from "
    "scores or a model",
  ),
  "curate": (
    "mrm_jax.commands.curate",
    "iterative curation: the flip, filter and vote steps, or the whole resumable loop (run)",
  ),
  "best-of-n": (
    "mrm_jax.commands.best_of_n",
    "pick the highest-reward response of each candidate set (all scores kept)",
  ),
}


class _Parser(argparse.ArgumentParser):
  """Usage errors as one line (`mrm-jax score: error: argument --batch-size: ...`), as every other
  error of the command; the usage itself is one `--help` away."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser(selected: str | None) -> argparse.ArgumentParser:
  parser = _Parser(
    prog="mrm-jax",
    description="DT2IT-MRM multimodal reward models in JAX: construct debiased preference data, "
    "reformulate T2I pairs, train, score, curate and evaluate reward models.",
  )
  parser.add_argument("--version", action="version", version=f"mrm-jax {__version__}")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", metavar="<command>")
  for name, (module, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    if name == selected:
      p.set_defaults(_module=module)
      importlib.import_module(module).add_arguments(p)
  _verbose_anywhere(parser)
  return parser


def _verbose_anywhere(parser: argparse.ArgumentParser) -> None:
  """`-v` after the (sub)command too (`mrm-jax judge -v`, `mrm-jax curate run ... -v`): every
  subparser
  gets the flag, defaulting to SUPPRESS so that leaving it out there keeps the top-level value."""
  for action in parser._actions:  # noqa: SLF001 - argparse keeps its subparsers nowhere public
    if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
      for p in action.choices.values():
        if "-v" not in p._option_string_actions and "--verbose" not in p._option_string_actions:
          p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
          )
        _verbose_anywhere(p)


def _selected_command(argv: list[str]) -> str | None:
  for token in argv:
    if token in COMMANDS:
      return token
    if not token.startswith("-"):
      return None
  return None


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  console.quiet_third_party(verbose=bool({"-v", "--verbose"} & set(argv)))
  selected = _selected_command(argv)
  parser = _build_parser(selected)
  args, extra = parser.parse_known_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  console.setup_logging(args.verbose)
  module = importlib.import_module(args._module)
  # Commands that take `--config.KEY=VALUE` overrides receive them as `args.overrides`.
  if getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False):
    args.overrides = extra
  elif extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  try:
    return int(module.run(args) or 0)
  except UserError as e:
    console.print_error(f"mrm-jax {args.command}: error: {e}")
    return 2
  except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
    console.print_error(f"mrm-jax {args.command}: error: {e.filename}: {e.strerror}")
    return 2
  except KeyboardInterrupt:
    console.print_error(f"mrm-jax {args.command}: interrupted")
    return 130
  finally:
    console.release_background_work()


if __name__ == "__main__":
  sys.exit(main())
