"""The paper's recipe on Qwen2.5-VL-7B-Instruct (see `mrm_jax.config.paper_config`).

Point `model.path` (or `--init_from`) at a local HF download of Qwen2.5-VL-7B-Instruct and
`data.train` at the pair file(s). Append a topology to the config name for a given machine, e.g.
`configs/qwen2_5_vl_7b.py:h200x8` (names in `mrm_jax/topologies.py`).
"""

from mrm_jax.config import paper_config


def get_config(topology=None):
  return paper_config("qwen2_5_vl", "qwen2.5-vl-7b", grad_accum=8, topology=topology)
