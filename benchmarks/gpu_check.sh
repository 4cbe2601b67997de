#!/usr/bin/env bash
# The GPU check, in one command on a GPU machine (one H100: at most 8 minutes, set-up
# included): sets up a virtualenv from this repository's own files (dev.sh with a CUDA torch
# and faiss-gpu, in .venv-gpu), then runs benchmarks/gpu_check.py, which runs the GPU tests
# and measures embedding (texts/s in fp16), exact kNN at 1M against faiss-gpu's flat index,
# and approximate kNN at recall 0.95; one PASS, FAIL or SKIP line per item. Exit 1 on a FAIL.
#
#   benchmarks/gpu_check.sh [gpu_check.py options: --model DIR, --big N, --only ITEM ...]
#   GPU_CHECK_PYTHON=python benchmarks/gpu_check.sh --model DIR   # an environment as it is:
#       nothing installed (no network needed); faiss steps SKIP without faiss-gpu
#
# Without an NVIDIA GPU it says so, installs nothing and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPU_CHECK_STARTED=${GPU_CHECK_STARTED:-$(date +%s)}

gpu_present() {
  { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; } ||
    ls /dev/nvidia[0-9]* >/dev/null 2>&1
}

if ! gpu_present; then
  echo "SKIP gpu-check: no NVIDIA GPU on this machine (nvidia-smi lists none, no /dev/nvidia0)"
  exit 0
fi

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  py=$GPU_CHECK_PYTHON
else
  GRAPHBUILD_VENV=.venv-gpu GRAPHBUILD_TORCH=cuda GRAPHBUILD_FAISS=gpu ./dev.sh setup
  py=.venv-gpu/bin/python
fi
echo "gpu-check: set-up done in $(( $(date +%s) - GPU_CHECK_STARTED ))s; $("$py" -V)" >&2
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$py" benchmarks/gpu_check.py "$@"
