#!/usr/bin/env bash
# Run on a machine with network access (the CPU machine), before the GPU check: the wheels that the
# GPU machine's image lacks, for its Python 3.12, into .whl/ (git-ignored), which travels with the
# working tree; benchmarks/gpu_check.sh installs from it with `pip install --no-index --find-links .whl`
# (only what the machine does not already have, into its temporary folder).
#
#   bash benchmarks/gpu_prep.sh
#
# The image has torch, transformers, safetensors, tokenizers, einops, pytest and huggingface_hub (with
# their dependencies: numpy, requests, pyyaml, tqdm, filelock, regex, httpx). Missing are diffusers
# (the reference pipeline), gguf (the GGUF writer of gpu_paths) and importlib_metadata (diffusers
# imports it), and their dependencies not in that list: zipp (importlib_metadata) and Pillow
# (diffusers' image utilities, imported with diffusers). All are fetched as binary wheels without
# their dependencies, so nothing else can come along unnoticed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
git check-ignore -q .whl/ || {
    echo "gpu_prep: .whl/ is not git-ignored; refusing to fill it" >&2
    exit 1
}
mkdir -p .whl
"$PY" -m pip download --quiet --disable-pip-version-check --dest .whl \
    --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps \
    diffusers==0.42.1 gguf importlib_metadata zipp pillow
ls -l .whl
