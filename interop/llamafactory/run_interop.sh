#!/usr/bin/env bash
# LLaMA-Factory <-> mrm-jax reward agreement on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL
# models (Qwen3-VL with LLaMA-Factory's templates qwen3_vl_nothink and qwen3_vl), on CPU.
# Not part of CI: a few minutes per family. See interop.py for what it checks.
#
#   interop/llamafactory/run_interop.sh [WORKDIR] [--only qwen2_vl:qwen2_vl,...]
#
# LF_VENV   LLaMA-Factory's virtualenv (default interop/llamafactory/.venv-lf), created with
#           torch==2.14.1 torchvision==0.29.1 llamafactory==0.9.5 when it has no python yet
# MRM_JAX   the mrm-jax command (default: mrm-jax on PATH)
# Exit status 0 when every bound holds (1e-4 plain records, 1e-3 resized / RGBA / thin images).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lf_venv="${LF_VENV:-$here/.venv-lf}"
mrm_jax="${MRM_JAX:-mrm-jax}"
work="${1:-$(mktemp -d -t mrm-lf-interop.XXXXXX)}"
[ $# -gt 0 ] && shift

if [ ! -x "$lf_venv/bin/python" ]; then
  echo "creating LLaMA-Factory's virtualenv in $lf_venv" >&2
  python3 -m venv "$lf_venv"
  "$lf_venv/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1 llamafactory==0.9.5
fi
"$lf_venv/bin/python" -c 'import llamafactory, torch, torchvision' || {
  echo "$lf_venv has no working LLaMA-Factory (pip install torch==2.14.1 torchvision==0.29.1" \
    "llamafactory==0.9.5)" >&2
  exit 2
}
command -v ${mrm_jax%% *} >/dev/null || { echo "no mrm-jax command: set MRM_JAX" >&2; exit 2; }

echo "work directory: $work" >&2
exec "$lf_venv/bin/python" "$here/interop.py" --workdir "$work" --mrm-jax "$mrm_jax" "$@"
