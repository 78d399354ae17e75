"""The `mrm-jax` subcommands: argparse wiring over the library, one module per command.

Each module exposes `add_arguments(parser)` and `run(args) -> int | None` (and
`ACCEPTS_CONFIG_OVERRIDES = True` when it takes `--config.KEY=VALUE`). Library modules never import
from here; `tests/test_import_graph.py` checks it.
"""
