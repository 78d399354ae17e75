#!/usr/bin/env bash
# The H200 check (issue 21) on the device machine: bash benchmarks/gpu_check.sh [gpu_check.py flags]
#
#   bash benchmarks/gpu_check.sh --prepare   # here, before the device run: copies the PyTorch peer and an
#                                            # ml_collections wheel (missing there) into .gpu_check/ (ignored)
#   bash benchmarks/gpu_check.sh             # there (device tool, carry [".gpu_check"]): $OUT/gpu_check.*
#   bash benchmarks/gpu_check.sh --only 3    # a rerun of what failed
set -euo pipefail
cd "$(dirname "$0")/.."
prep=.gpu_check

if [[ "${1:-}" == "--prepare" ]]; then
  shared="${SHARED_BENCH:-../shared/bench}"
  mkdir -p "$prep/bench" "$prep/whl"
  install -m 644 "$shared/peer_torch_rm_step.py" "$prep/bench/"
  # pure-python wheel; its needs (absl-py, PyYAML) are on the device image
  python3 -m pip download --no-deps --only-binary=:all: -d "$prep/whl" "ml_collections>=1.0"
  ls -l "$prep/bench" "$prep/whl"
  exit 0
fi

py="${PYTHON:-python3}"
if ! "$py" -c "import ml_collections" 2>/dev/null; then
  if ls "$prep"/whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site \
      "$prep"/whl/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "ml_collections is missing and $prep/whl holds no wheel: run 'bash $0 --prepare' first" >&2
  fi
fi
exec "$py" benchmarks/gpu_check.py --python "$py" --out "${OUT:-gpu_check_out}" "$@"
