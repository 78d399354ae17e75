"""The paper's recipe on Qwen2-VL-2B-Instruct (see `mrm_jax.config.paper_config`).

Point `model.path` (or `--init_from`) at a local HF download of Qwen2-VL-2B-Instruct and
`data.train` at the pair file(s). Append a topology to the config name for a given machine, e.g.
`configs/qwen2_vl_2b.py:h200x8` (names in `mrm_jax/topologies.py`).
"""

from mrm_jax.config import paper_config


def get_config(topology=None):
  return paper_config("qwen2_vl", "qwen2-vl-2b", grad_accum=4, topology=topology)
