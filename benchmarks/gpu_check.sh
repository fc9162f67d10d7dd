#!/usr/bin/env bash
# The GPU check, in two commands of at most 6 minutes each on the GPU machine (one H100 or H200):
#
#   bash benchmarks/gpu_check.sh 1   # environment, attention probe, headline vs diffusers, gpu tests, paths
#   bash benchmarks/gpu_check.sh 2   # compile (per block, whole model), GGUF compiled, a second size
#   FLUX_SCHNELL_GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh 1   # CPU rehearsal, seconds (CI runs it)
#
# Every row is printed as it is measured (a kill keeps what was measured); each step has its own
# `timeout`, the limits of a part sum to under 360 s; the exit status is 1 if a step failed, 2 if the
# environment lacks a required package. Logs go to $OUT when it is set. Temporary files (the packages
# from .whl/, the checkout's package link, gpu_paths' weight files) live in one folder that a trap
# removes on any exit, SIGTERM and SIGINT included.
#
# The machine's image has torch, transformers, safetensors, tokenizers, einops, pytest and
# huggingface_hub; diffusers, gguf and importlib_metadata travel as wheels in .whl/ (git-ignored),
# made on a machine with network access by `bash benchmarks/gpu_prep.sh`. A package still missing
# turns its rows into "skipped: no <package>". GPU_CHECK_HIDE="diffusers gguf" hides installed
# packages (how the rehearsal proves that).
set -uo pipefail
cd "$(dirname "$0")/.."

part=${1:-}
if [[ $part != 1 && $part != 2 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh 1|2" >&2
    exit 2
fi
PY=${PYTHON:-python3}
TINY=${FLUX_SCHNELL_GPU_CHECK_TINY:-0}
export PYTHONUNBUFFERED=1

work=$(mktemp -d "${TMPDIR:-/tmp}/flux-gpu-check.XXXXXX") || exit 2
child=""
cleanup() {
    [[ -n $child ]] && kill -TERM "$child" 2>/dev/null && wait "$child" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
export TMPDIR=$work # whatever a step makes in a temp dir goes with the rest

if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    log=$OUT/gpu_check_part$part.log
else
    log=$work/gpu_check_part$part.log
fi
exec > >(tee -a "$log") 2>&1

# diffusers, gguf, importlib_metadata from .whl/ where the machine lacks them (into the temp folder)
if compgen -G ".whl/*.whl" >/dev/null; then
    cat >"$work/missing_wheels.py" <<'EOF'
import sys
from importlib import metadata
for wheel in sys.argv[1:]:
    name = wheel.rsplit("/", 1)[-1].split("-")[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(wheel)
EOF
    missing=$("$PY" "$work/missing_wheels.py" .whl/*.whl)
    if [[ -n $missing ]]; then
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-index --find-links .whl --no-deps --no-compile --target "$work/site" \
            $missing || exit 2
        export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
for hidden in ${GPU_CHECK_HIDE:-}; do # a package that raises ImportError, ahead of the real one
    mkdir -p "$work/hide/$hidden"
    echo "raise ImportError('$hidden hidden by GPU_CHECK_HIDE')" >"$work/hide/$hidden/__init__.py"
done
[[ -n ${GPU_CHECK_HIDE:-} ]] && export PYTHONPATH=$work/hide${PYTHONPATH:+:$PYTHONPATH}
# this checkout as the package `comfyui_flux_schnell`, whatever its folder is called
mkdir -p "$work/pkg" && ln -s "$PWD" "$work/pkg/comfyui_flux_schnell"
export PYTHONPATH=$work/pkg:$PWD${PYTHONPATH:+:$PYTHONPATH}

failed=()
step() { # step NAME SECONDS COMMAND...: run under a time limit; its output is in the log as it comes
    local name=$1 limit=$2 started rc
    shift 2
    echo
    echo "=== $name (limit ${limit} s): $*"
    started=$(date +%s)
    timeout "$limit" "$@" &
    child=$!
    wait "$child"
    rc=$?
    child=""
    echo "=== $name: exit $rc after $(($(date +%s) - started)) s"
    [[ $rc -eq 0 ]] || failed+=("$name (exit $rc)")
}

tiny_args=()
paths_args=(--config reduced --device cuda --no-compile)
if [[ $TINY == 1 ]]; then
    tiny_args=(--tiny)
    paths_args=(--config tiny --device cpu --no-compile)
fi

if [[ $part == 1 ]]; then # limits: 20 + 30 + 150 + 40 + 110 = 350 s
    cat >"$work/environment.py" <<'EOF'
import importlib, os, shutil, subprocess, sys
tiny = sys.argv[1] == "1"
if not tiny and shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available(), flush=True)
free = shutil.disk_usage(os.environ["TMPDIR"]).free
print(f"free disk in the temp folder: {free / 2**30:.1f} GiB; cpus {os.cpu_count()}", flush=True)
missing = []
for name in ("transformers", "safetensors", "tokenizers", "einops", "pytest", "numpy",
             "comfyui_flux_schnell.local_backend"):
    try:
        module = importlib.import_module(name)
        print(f"ok {name} {getattr(module, '__version__', '')}", flush=True)
    except ImportError as e:
        missing.append(f"{name} ({e})")
for name in ("diffusers", "gguf", "importlib_metadata"):
    try:
        module = importlib.import_module(name)
        print(f"ok {name} {getattr(module, '__version__', '')}", flush=True)
    except ImportError:
        print(f"skipped: no {name} (its rows are skipped; bash benchmarks/gpu_prep.sh makes .whl/)", flush=True)
if not tiny and not torch.cuda.is_available():
    missing.append("a CUDA device")
if missing:
    sys.exit("missing: " + ", ".join(missing))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB", flush=True)
EOF
    step environment 20 "$PY" "$work/environment.py" "$TINY"
    if ((${#failed[@]})); then
        echo "gpu_check: the environment lacks what the check needs (log: $log)"
        exit 2
    fi
    step attention_probe 30 "$PY" -m benchmarks.gpu_headline --part probe "${tiny_args[@]}"
    step headline 150 "$PY" -m benchmarks.gpu_headline --part headline "${tiny_args[@]}"
    mapfile -t gpu_tests < <(grep -l "mark.gpu" tests/test_*.py)
    step gpu_tests 40 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${gpu_tests[@]}"
    gguf_arg=()
    "$PY" -c "import gguf" 2>/dev/null || { gguf_arg=(--no-gguf) && echo "gpu_paths GGUF cases: skipped: no gguf"; }
    step gpu_paths 110 "$PY" -m benchmarks.gpu_paths "${paths_args[@]}" "${gguf_arg[@]}" --folder "$work/files"
else # limits: 180 + 150 = 330 s
    step compile 180 "$PY" -m benchmarks.gpu_headline --part compile "${tiny_args[@]}"
    step gguf_compile 150 "$PY" -m benchmarks.gpu_headline --part gguf-compile "${tiny_args[@]}"
fi

echo
if ((${#failed[@]})); then
    echo "gpu_check part $part: FAILED: ${failed[*]} (log: $log)"
    exit 1
fi
echo "gpu_check part $part: every step passed (log: $log)"
