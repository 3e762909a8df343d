#!/usr/bin/env bash
# One command that proves the GPU path and writes one report (issue 17, "The GPU check"):
#
#   scripts/gpu_check.sh --out runs/gpu_check            # one GPU (H100/H200), < 8 minutes
#   scripts/gpu_check.sh --cpu --out runs/gpu_check_cpu  # no GPU: the CPU-runnable steps
#
# Writes DIR/gpu_check.json and DIR/gpu_check.md (steps, checks, figures) plus each step's
# outputs. On a GPU image without deepspeed, datasets or pydantic it first installs them from
# wheels built beforehand by scripts/build_gpu_wheels.sh (--wheels DIR, default .whl/):
# offline, --no-deps, never touching torch. Extra arguments go to python -m sap_ds.gpu_check
# (e.g. --steps 1,2,3). Exit code: 0 when every step that ran passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=""
CPU=0
WHEELS="$ROOT/.whl"
PY="${PYTHON:-python3}"
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --cpu) CPU=1; shift ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
[ -n "$OUT" ] || { echo "gpu_check.sh: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"

# Install what the image lacks, from the wheel folder only (no index, no dependencies: the
# folder holds exactly the closure the GPU image misses; torch and friends stay as they are).
missing="$("$PY" - "$WHEELS" <<'PYEOF'
# A wheel's package is installed when it is absent or older than the wheel (typing-extensions:
# pydantic needs a recent one). Versions compare by their release numbers.
import importlib.metadata, pathlib, re, sys
folder = pathlib.Path(sys.argv[1])
release = lambda v: tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", v).group(0).split("."))
wanted = {}
for wheel in (folder.glob("*.whl") if folder.is_dir() else []):
    name, version = wheel.name.split("-")[:2]
    wanted[name.replace("_", "-").lower()] = version
def needed(name, version):
    try:
        return release(importlib.metadata.version(name)) < release(version)
    except importlib.metadata.PackageNotFoundError:
        return True
print(" ".join(f"{n}=={v}" for n, v in sorted(wanted.items()) if needed(n, v)))
PYEOF
)"
if [ -n "$missing" ]; then
    echo "gpu_check.sh: installing from $WHEELS: $missing"
    # shellcheck disable=SC2086
    if ! DS_BUILD_OPS=0 "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS" $missing >"$OUT/install.log" 2>&1; then
        echo "gpu_check.sh: pip install failed (see $OUT/install.log); step 1 will say what is missing" >&2
    fi
else
    echo "nothing to install (wheel folder: $WHEELS)" >"$OUT/install.log"
fi

export PYTHONPATH="$ROOT:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"  # sap_ds and sap_ds_kernels from this checkout
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$CPU" = 1 ]; then
    # Triton reads TRITON_INTERPRET when it is imported: it must be set before anything runs.
    export DS_ACCELERATOR=cpu TRITON_INTERPRET=1 OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
    ARGS+=(--cpu)
else
    # Deterministic cuBLAS for step 5's noise floor with torch.use_deterministic_algorithms.
    export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
    export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-cache-gpu-check}"
fi
exec "$PY" -m sap_ds.gpu_check --out "$OUT" "${ARGS[@]}"
