#!/usr/bin/env bash
# Build the wheel folder scripts/gpu_check.sh installs on a GPU machine that has torch,
# triton, transformers and peft but no network and no deepspeed, datasets or pydantic:
#
#   scripts/build_gpu_wheels.sh [--out .whl] [--python-versions "3.12 3.11"]
#
# The folder holds exactly what that image lacks (the device docs list its packages): DeepSpeed
# built here without compiled ops (DS_BUILD_OPS=0, a pure-Python wheel), hjson (its one
# dependency the image misses), pydantic with pydantic-core, annotated-types,
# typing-inspection and typing-extensions, and datasets with dill and multiprocess. Training
# cannot run without datasets, and datasets needs pyarrow, pandas, xxhash, fsspec and
# huggingface-hub, which the image has: the pyarrow wheel alone (~47 MiB for cp312) would not
# fit the 64 MiB the device tool carries. Versions are the ones tested here (requirements-cpu.txt,
# and this machine's environment for the rest, which pip resolved against them). Binary wheels
# are fetched for each Python version given (the image's python3 is 3.12). Last, the folder is
# checked against itself: every requirement one wheel has on another must hold (the GPU side
# installs with --no-deps, so nothing else checks it), and what it asks of the image is printed
# (datasets 5.2.0: pyarrow>=24.0.0, fsspec<=2026.9.0, huggingface-hub>=1.31.0,<3.0).
# tests/test_gpu_wheels.py installs the folder into a clean Python 3.12 venv holding the image's
# versions (make test-install). It must stay small: the device tool carries the whole working
# tree, shared/ and this folder in 64 MiB.
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
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
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

# The set against itself, for each Python version: wheel-to-wheel requirements must hold;
# the rest is what the image must provide.
"$PY" - "$OUT" $PYVERS <<'PYEOF'
import email.parser, pathlib, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, pyvers = pathlib.Path(sys.argv[1]), sys.argv[2:]
wheels = sorted(folder.glob("*.whl"))
versions = {}
for wheel in wheels:
    name, version, _, _ = parse_wheel_filename(wheel.name)
    versions.setdefault(name, set()).add(version)
two = {n: sorted(map(str, v)) for n, v in versions.items() if len(v) > 1}
if two:
    sys.exit(f"build_gpu_wheels.sh: two versions of one package stop the install: {two}")
broken, from_image = [], {}
for pyver in pyvers:
    env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            requires = email.parser.Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []
        owner = parse_wheel_filename(wheel.name)[0]
        for req in map(Requirement, requires):
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            if name in versions:
                shipped = next(iter(versions[name]))
                if not req.specifier.contains(shipped, prereleases=True):
                    broken.append(f"{owner} needs {req}, the folder has {name} {shipped}")
            else:
                from_image.setdefault(name, set()).add(f"{req.specifier or 'any'} ({owner})")
if broken:
    sys.exit("build_gpu_wheels.sh: the folder does not satisfy itself:\n  " + "\n  ".join(sorted(set(broken))))
print("build_gpu_wheels.sh: what the folder asks of the image (it ships none of these):")
for name in sorted(from_image):
    print(f"  {name}: " + "; ".join(sorted(from_image[name])))
PYEOF

total=$(du -sk "$OUT" | cut -f1)
echo "build_gpu_wheels.sh: $OUT holds $(ls "$OUT"/*.whl | wc -l) wheels, $((total / 1024)) MiB:"
ls -1s --block-size=K "$OUT"/*.whl | sed 's|^|  |'
if [ "$total" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "build_gpu_wheels.sh: over $LIMIT_MIB MiB: with the working tree and shared/ it would not fit the 64 MiB the device tool carries" >&2
    exit 1
fi
