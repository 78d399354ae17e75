"""The paper's recipe on Qwen3-VL-8B-Instruct (see `mrm_jax.config.paper_config`).

Point `model.path` (or `--init_from`) at a local HF download of Qwen3-VL-8B-Instruct and
`data.train` at the pair file(s). Append a topology to the config name for a given machine, e.g.
`configs/qwen3_vl_8b.py:h200x8` (names in `mrm_jax/topologies.py`).
"""

from mrm_jax.config import paper_config


def get_config(topology=None):
  return paper_config("qwen3_vl", "qwen3-vl-8b", grad_accum=8, topology=topology)
