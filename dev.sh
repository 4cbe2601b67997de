#!/usr/bin/env bash
# Set up graphbuild in ./.venv, then run something in it.
#
#   ./dev.sh demo     set up, then build the default run (ImageNet-1k classes) and show it
#   ./dev.sh test     set up with test extras, then run the test suite
#   ./dev.sh setup    set up only
#
# Set-up installs graphbuild with its pipeline and test extras, torch and faiss in a flavour:
# GRAPHBUILD_TORCH=cpu|cuda and GRAPHBUILD_FAISS=cpu|gpu (faiss-cpu or faiss-gpu-cu12). A new
# venv gets cpu and cpu; an existing one keeps what it has unless asked for the other flavour,
# which then replaces it (the venv's torch or faiss is uninstalled, the one asked for
# installed). On a machine whose nvidia-smi lists a GPU, a torch without CUDA is replaced by
# a CUDA one unless GRAPHBUILD_TORCH=cpu was asked for, and what still cannot use the GPU
# (faiss-cpu, a torch or faiss that sees no GPU) is said at the end. torch is torch==2.13.0 from pip's indexes, or from GRAPHBUILD_TORCH_INDEX=URL,
# e.g. PyTorch's own CPU-only or CUDA wheel index (see pytorch.org, "Get started"): PyPI's
# torch for Linux x86_64 is a CUDA build, which also runs on a CPU.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${GRAPHBUILD_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH=torch==2.13.0
FAISS_GPU=faiss-gpu-cu12

pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# Whether this machine has an NVIDIA GPU: nvidia-smi lists one.
gpu_present() {
  command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

# The venv's torch: "cuda" for a build with CUDA, "cpu" for one without, "" for none.
torch_build() {
  "$VENV/bin/python" -c "import torch; print('cuda' if torch.version.cuda else 'cpu')" \
    2>/dev/null || true
}

# torch in the flavour asked for. $VENV/.graphbuild-torch records the flavour installed and
# the index it came from: where the plain torch line gives a CUDA build, that build stands for
# "cpu" (it runs on a CPU) until another index is given; a third line "asked" when
# GRAPHBUILD_TORCH chose it. On a GPU machine a torch without CUDA stays only if asked for.
setup_torch() {
  local stamp="$VENV/.graphbuild-torch" build recorded=() index=${GRAPHBUILD_TORCH_INDEX:-}
  build=$(torch_build)
  [ -f "$stamp" ] && mapfile -t recorded < "$stamp"
  local want=${GRAPHBUILD_TORCH:-${recorded[0]:-${build:-cpu}}}
  local asked=${GRAPHBUILD_TORCH:+asked}
  [ -z "$asked" ] && [ "${recorded[0]:-}" = "$want" ] && asked=${recorded[2]:-}
  if [ "$want" = cpu ] && [ "$build" != cuda ] && [ -z "$asked" ] && gpu_present; then
    local have="a CPU-only torch"
    [ -z "$build" ] && have="no torch"
    echo "dev.sh: nvidia-smi lists a GPU and $VENV has $have: installing a CUDA one" \
         "(GRAPHBUILD_TORCH=cpu keeps torch CPU-only)" >&2
    want=cuda
  fi
  case "$want" in
    cpu|cuda) ;;
    *) echo "dev.sh: GRAPHBUILD_TORCH must be cpu or cuda" >&2; exit 2 ;;
  esac
  local keep="$want"$'\n'"${index:-${recorded[1]:-}}"$'\n'"$asked"
  case "$want/$build" in
    cpu/cpu|cuda/cuda) printf '%s\n' "$keep" > "$stamp"; return 0 ;;
    cpu/cuda)  # what the cpu line gave, unless another index is given now
      [ "${recorded[0]:-}" = cpu ] && [ "${index:-${recorded[1]:-}}" = "${recorded[1]:-}" ] &&
        { printf '%s\n' "$keep" > "$stamp"; return 0; } ;;
  esac
  if [ -n "$build" ]; then
    echo "dev.sh: replacing the venv's torch ($build build) for GRAPHBUILD_TORCH=$want" >&2
    pip_ uninstall -y torch
  fi
  echo "dev.sh: installing $TORCH for GRAPHBUILD_TORCH=$want${index:+ from $index}" >&2
  pip_ install ${index:+--index-url "$index"} "$TORCH"
  build=$(torch_build)
  if [ "$want" = cuda ] && [ "$build" != cuda ]; then
    echo "dev.sh: pip installed a torch without CUDA; give GRAPHBUILD_TORCH_INDEX a CUDA" \
         "wheel index (pytorch.org, \"Get started\")" >&2
    exit 2
  fi
  [ "$want" = cpu ] && [ "$build" = cuda ] &&
    echo "dev.sh: this $TORCH is a CUDA build (it runs on a CPU too); GRAPHBUILD_TORCH_INDEX" \
         "set to PyTorch's CPU-only wheel index gives a smaller one" >&2
  printf '%s\n%s\n%s\n' "$want" "$index" "$asked" > "$stamp"
}

# graphbuild[pipeline,$extras] with faiss in the flavour asked for: faiss-cpu (the extra) or
# faiss-gpu-cu12. The two ship the same `faiss` module, so a venv holding another faiss has it
# uninstalled first. The project is reinstalled when its dependency list changed.
setup_project() {
  local extras=$1 dists=() have= ok=false packages=()
  mapfile -t dists < <("$VENV/bin/python" -c "import importlib.metadata as m
names = sorted({n for d in m.distributions()
                if (n := (d.metadata['Name'] or '').lower().replace('_', '-')).startswith('faiss')})
names and print(*names, sep='\n')")
  case " ${dists[*]} " in *" faiss-gpu"*) have=gpu ;; *" faiss-cpu "*) have=cpu ;; esac
  local want=${GRAPHBUILD_FAISS:-${have:-cpu}}
  case "$want" in
    cpu) [ "${dists[*]}" = faiss-cpu ] && ok=true
         extras="pipeline,faiss-cpu,$extras" ;;
    gpu) [ ${#dists[@]} = 1 ] && [[ ${dists[0]} = faiss-gpu* ]] && ok=true
         $ok || packages=("$FAISS_GPU")
         extras="pipeline,$extras" ;;
    *) echo "dev.sh: GRAPHBUILD_FAISS must be cpu or gpu" >&2; exit 2 ;;
  esac
  if ! $ok && [ ${#dists[@]} -gt 0 ]; then
    echo "dev.sh: replacing ${dists[*]} for GRAPHBUILD_FAISS=$want" >&2
    pip_ uninstall -y "${dists[@]}"
  fi
  local stamp="$VENV/.graphbuild-$extras-$(cksum < pyproject.toml | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || ! $ok; then
    echo "dev.sh: installing graphbuild[$extras]${packages[*]:+ ${packages[*]}} into $VENV" >&2
    pip_ install -e ".[$extras]" "${packages[@]}"
    touch "$stamp"
  fi
}

# On a GPU machine, say what in the venv cannot use the GPU: a torch that sees no CUDA device
# (a CPU build, or a driver older than its CUDA), faiss-cpu, or a faiss-gpu that sees no GPU.
check_gpu_use() {
  gpu_present || return 0
  local seen
  seen=$("$VENV/bin/python" -c "import torch
try:
    import faiss
    gpus = faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0
except ImportError:
    gpus = -1
print(torch.cuda.device_count() if torch.cuda.is_available() else 0, gpus,
      torch.version.cuda or 'none')" 2>/dev/null) || seen="0 -1 none"
  read -r torch_gpus faiss_gpus torch_cuda <<< "$seen"
  [ "$torch_gpus" -gt 0 ] ||
    echo "dev.sh: nvidia-smi lists a GPU, but $VENV's torch sees none (torch.version.cuda:" \
         "$torch_cuda): embed and exact knn will run on the CPU; GRAPHBUILD_TORCH=cuda with" \
         "GRAPHBUILD_TORCH_INDEX set to a CUDA wheel index matching the driver fixes it" >&2
  [ "$faiss_gpus" -gt 0 ] || [ "$faiss_gpus" -lt 0 ] ||
    echo "dev.sh: nvidia-smi lists a GPU, but $VENV's faiss has none (faiss-cpu, or" \
         "faiss-gpu without a matching CUDA): approximate knn searches on the CPU;" \
         "GRAPHBUILD_FAISS=gpu ./dev.sh setup installs $FAISS_GPU" >&2
  return 0
}

setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  setup_torch
  setup_project "$1"
  check_gpu_use
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
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
