#!/usr/bin/env bash
# One command for a CUDA machine (an H100 or H200): every CUDA path of the package once, with random
# full-size weights at 1024x1024, then the speed and memory tables against diffusers. Planned to
# finish in under 8 minutes; each step has its own time limit, so one that hangs does not stop the
# rest, and the exit status is 1 if any step failed.
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine, from the repository root
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_CONFIG=tiny bash benchmarks/gpu_check.sh   # the script itself, on a CPU
#
# The machine's Python needs torch, transformers, tokenizers, einops, safetensors and pytest; what it
# lacks (diffusers, gguf, importlib_metadata) can travel as wheels in .whl/ (git-ignored), made on
# a machine with network access:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 gguf importlib_metadata
# Logs of each step go to $OUT (or /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_CHECK_DEVICE:-cuda}
CONFIG=${GPU_CHECK_CONFIG:-schnell}
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
# this checkout as the package `comfyui_flux_schnell`, whatever its folder is called
mkdir -p /tmp/gpu_check_pkg && ln -sfn "$PWD" /tmp/gpu_check_pkg/comfyui_flux_schnell
export PYTHONPATH=/tmp/gpu_check_pkg${PYTHONPATH:+:$PYTHONPATH}

failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log
    local name=$1 limit=$2 started rc
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    started=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(($(date +%s) - started)) s"
    [[ $rc -eq 0 ]] || failed+=("$name (exit $rc)")
}

if [[ $DEVICE == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

# 1. the tests marked `gpu` (GGUF bytes to the GPU and back, ...)
step gpu_tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gguf.py
# 2. every path through generate_local: dtypes, GGUF, LoRA, memory choices, compile, out of memory
paths_args=(--config "$CONFIG" --device "$DEVICE")
[[ $DEVICE == cuda ]] || paths_args+=(--no-compile)
step gpu_paths 330 "$PY" -m benchmarks.gpu_paths "${paths_args[@]}"
# 3. the whole pipeline against diffusers' FluxPipeline (same weights): stage times, peak memory
step pipeline_vs_diffusers 150 "$PY" -m benchmarks.local_pipeline --config "$CONFIG" --device "$DEVICE" --repeats 2
# 4. per forward: GGUF dequantization and LoRA overhead against bf16
speed_config=$([[ $CONFIG == tiny ]] && echo tiny || echo schnell)
step gguf_overhead 90 "$PY" -m benchmarks.local_speed --gguf --device "$DEVICE" --config "$speed_config" --repeats 3
step lora_overhead 90 "$PY" -m benchmarks.local_speed --part lora --device "$DEVICE" --config "$speed_config" --repeats 3

echo
if ((${#failed[@]})); then
    echo "gpu_check: FAILED: ${failed[*]} (logs in $LOGS)"
    exit 1
fi
echo "gpu_check: every step passed (logs in $LOGS)"
