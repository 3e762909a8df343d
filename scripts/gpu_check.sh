#!/usr/bin/env bash
# The GPU check (issue 17, "The GPU check"; split in two parts for short GPU leases, issue 31):
#
#   scripts/gpu_check.sh --part 1 --out OUT/gc1 --scratch /tmp/gc  # correctness (steps 1,2,4,5,7), ~4-5 min
#   scripts/gpu_check.sh --part 2 --out OUT/gc2 --scratch /tmp/gc  # speed (steps 1,3,6), ~4-5 min
#   scripts/gpu_check.sh --out runs/gpu_check                      # all 7 steps in one go, ~8-10 min
#   scripts/gpu_check.sh --cpu --out runs/gpu_check_cpu            # no GPU: every step, CPU-sized
#
# Each writes OUT/gpu_check.json and OUT/gpu_check.md (steps, checks, figures) plus small
# records (logs, JSON); runs, checkpoints and exports go under --scratch (default OUT/scratch).
# On a GPU image without deepspeed, datasets or pydantic it first installs them from wheels
# built beforehand by scripts/build_gpu_wheels.sh (--wheels DIR, default .whl/): offline,
# --no-deps, never touching torch. Other arguments go to python -m sap_ds.gpu_check
# (--part, --steps, --scratch, --engine-timeout). Exit code: 0 when every step that ran passed.
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
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
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
# --no-deps checks nothing: say here, not at an import in step 4, when the image's own packages miss
# what the wheels need (datasets 5.2.0 wants pyarrow >= 24 and fsspec <= 2026.9.0). A warning only:
# the image may carry conflicts of its own that do not touch the check.
if ! "$PY" -m pip check >>"$OUT/install.log" 2>&1; then
    echo "gpu_check.sh: pip check found unmet requirements (see $OUT/install.log)" >&2
fi

export PYTHONPATH="$ROOT:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"  # sap_ds and sap_ds_kernels from this checkout
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$CPU" = 1 ]; then
    # Triton reads TRITON_INTERPRET when it is imported: it must be set before anything runs.
    export DS_ACCELERATOR=cpu TRITON_INTERPRET=1 OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
    ARGS+=(--cpu)
else
    # (step 5's deterministic cuBLAS workspace is set by sap_ds.gpu_check for its launch only)
    export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-cache-gpu-check}"
fi
exec "$PY" -m sap_ds.gpu_check --out "$OUT" "${ARGS[@]}"
