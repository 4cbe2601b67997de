#!/usr/bin/env bash
# Set up graphbuild in ./.venv, then run something in it.
#
#   ./dev.sh demo     set up, then build the default run (ImageNet-1k classes) and show it
#   ./dev.sh test     set up with test extras, then run the test suite
#   ./dev.sh setup    set up only
#
# Torch: by default a CPU build (torch==2.13.0), so a CPU machine does not download a
# multi-GB CUDA build. GRAPHBUILD_TORCH=cuda installs a CUDA torch instead (and faiss-gpu
# with GRAPHBUILD_FAISS=gpu). GRAPHBUILD_TORCH_INDEX=URL makes pip take torch from that
# index, e.g. PyTorch's own CPU-only wheel index (see pytorch.org, "Get started").
set -euo pipefail
cd "$(dirname "$0")"

VENV=${GRAPHBUILD_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  local extras=$1
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    local index=()
    [ -n "${GRAPHBUILD_TORCH_INDEX:-}" ] && index=(--index-url "$GRAPHBUILD_TORCH_INDEX")
    case "${GRAPHBUILD_TORCH:-cpu}" in
      cpu) echo "dev.sh: installing torch 2.13.0 (CPU build where available)" >&2
           "${pip[@]}" install "${index[@]}" "torch==2.13.0" ;;
      cuda) echo "dev.sh: installing a CUDA build of torch" >&2
            "${pip[@]}" install "${index[@]}" "torch>=2.4" ;;
      *) echo "dev.sh: GRAPHBUILD_TORCH must be cpu or cuda" >&2; exit 2 ;;
    esac
  fi
  # Reinstall the project only when its dependency list changed.
  local stamp="$VENV/.graphbuild-$extras-$(cksum < pyproject.toml | cut -d' ' -f1)"
  if [ ! -f "$stamp" ]; then
    echo "dev.sh: installing graphbuild[$extras] into $VENV" >&2
    "${pip[@]}" install -e ".[$extras]"
    if [ "${GRAPHBUILD_FAISS:-cpu}" = gpu ]; then
      "${pip[@]}" uninstall -y faiss-cpu && "${pip[@]}" install faiss-gpu-cu12
    fi
    touch "$stamp"
  fi
}

# Programs some tests drive for real: Chromium (the HTML report), and SLURM with munge (a
# one-node cluster on localhost). Installed when we can (root with apt-get); without them
# those tests skip and say why.
system_test_deps() {
  local missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "dev.sh: installing ${missing[*]} for the tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null ||
      { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } ||
      echo "dev.sh: could not install ${missing[*]}; their tests will skip" >&2
  else
    echo "dev.sh: ${missing[*]} not installed (needs root and apt-get); their tests will skip" >&2
  fi
}

case "${1:-}" in
  setup) setup test ;;
  demo)
    setup test
    shift
    "$VENV/bin/graphbuild" run "$@"
    ;;
  test)
    setup test
    system_test_deps
    shift
    "$VENV/bin/python" -m pytest "$@"
    ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
