#!/usr/bin/env bash
# Build the wheel folder scripts/gpu_check.sh installs on a GPU machine that has torch,
# triton, transformers and peft but no network and no deepspeed, datasets or pydantic:
#
#   scripts/build_gpu_wheels.sh [--out .whl] [--python-versions "3.12 3.11"]
#
# The folder holds exactly what that image lacks (the device docs list its packages): DeepSpeed
# built here without compiled ops (DS_BUILD_OPS=0, a pure-Python wheel), hjson (its one
# dependency the image misses), pydantic with pydantic-core, annotated-types,
# typing-inspection and typing-extensions, and datasets with dill and multiprocess (pyarrow,
# pandas, xxhash, fsspec and aiohttp are in the image; without a new enough pyarrow the GPU
# check reads its files with the standard library). Versions are the ones tested here
# (requirements-cpu.txt, and this machine's environment for the rest). Binary wheels are
# fetched for each Python version given (the image's python3 is 3.12). It must stay small: the
# device tool carries the whole working tree, shared/ and this folder in 64 MiB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.whl"
PYVERS="3.12 3.11"
PY="${PYTHON:-python3}"
LIMIT_MIB=24
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --python-versions) PYVERS="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "build_gpu_wheels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"

version() {  # the tested version: requirements-cpu.txt's pin, else this environment's
    local pin
    pin="$(grep -i "^$1==" "$ROOT/requirements-cpu.txt" | cut -d= -f3 || true)"
    [ -n "$pin" ] && { echo "$pin"; return; }
    "$PY" -c "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))" "$1"
}

# DeepSpeed: its sdist compiles nothing with DS_BUILD_OPS=0; setup.py imports torch, so build
# in this environment (which has torch) rather than an isolated one.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(version deepspeed)"

PACKAGES="hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess"
for pyver in $PYVERS; do
    for name in $PACKAGES; do
        "$PY" -m pip download -q --no-deps --only-binary :all: --implementation cp --python-version "$pyver" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            -d "$OUT" "$name==$(version "$name")"
    done
done

total=$(du -sk "$OUT" | cut -f1)
echo "build_gpu_wheels.sh: $OUT holds $(ls "$OUT"/*.whl | wc -l) wheels, $((total / 1024)) MiB:"
ls -1s --block-size=K "$OUT"/*.whl | sed 's|^|  |'
if [ "$total" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "build_gpu_wheels.sh: over $LIMIT_MIB MiB: with the working tree and shared/ it would not fit the 64 MiB the device tool carries" >&2
    exit 1
fi
