#!/usr/bin/env bash
# What the GPU-machine check carries (issue 15 item 7), built here, where the package index can be reached:
# build/gpu-carry/ (git-ignored through /build/), about 45 MB, well inside the device tool's 64 MiB:
#   triton.tar.xz  the nvidia-pytriton wheel's tritonserver, Python backend, the stubs for Python 3.12 and 3.13,
#                  and the shared libraries they load (nvidia_pytriton.libs), in the wheel's own layout
#   site.tar.xz    the gateway's packages that the machine's image lacks, unpacked from cp3XX wheels at the
#                  versions of constraints.lock (pydicom, highdicom, tritonclient, cryptography, starlette, ...)
#   numpy1.tar.xz  numpy 1.26.4 for the same Python: the numpy-1.x environment the stubs may embed instead
# Usage: bench/gpu/prepare.sh [PYTHON_VERSION]   (default 3.12: the machine's python3, KINDS.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYV="${1:-3.12}"
CARRY=build/gpu-carry
VENV_PY=.venv/bin/python
mkdir -p "$CARRY"

pinned() {  # NAME -> NAME==VERSION from constraints.lock (case-insensitive), or NAME alone
    local line
    line=$(grep -i -m1 "^$1==" constraints.lock || true)
    echo "${line:-$1}"
}

site_dir=$("$VENV_PY" -c "import importlib.util, pathlib; s = importlib.util.find_spec('pytriton'); print(pathlib.Path(next(iter(s.submodule_search_locations))).parent)")
if [ ! -s "$CARRY/triton.tar.xz" ]; then
    echo "triton.tar.xz from $site_dir (xz -9: about a minute)"
    stubs=()
    for v in 3.12 3.13 "$PYV"; do
        [ -d "$site_dir/pytriton/tritonserver/python_backend_stubs/$v" ] && stubs+=("pytriton/tritonserver/python_backend_stubs/$v")
    done
    # libpython3-*.13.so is the wheel's own Python for its 3.13 tools, not a stub's: the stubs link the system's.
    tar -C "$site_dir" -cf - --exclude='libpython3-*' nvidia_pytriton.libs pytriton/tritonserver/bin \
        pytriton/tritonserver/backends pytriton/tritonserver/caches "${stubs[@]}" \
        | xz -9 -T2 >"$CARRY/triton.tar.xz.tmp"
    mv "$CARRY/triton.tar.xz.tmp" "$CARRY/triton.tar.xz"
fi

wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
download() {  # DEST PACKAGE... : binary wheels for CPython $PYV on manylinux x86-64, without their dependencies
    local dest=$1
    shift
    "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
    local got
    got=$(ls "$dest"/*.whl 2>/dev/null | wc -l)
    if [ "$got" -ne $# ]; then
        echo "prepare.sh: asked for $# wheels ($*), got $got in $dest" >&2
        exit 1
    fi
}
pack() {  # DIR ARCHIVE: every wheel in DIR unpacked into one tree (what pip --target would hold), xz-compressed
    local tree
    tree=$(mktemp -d -p "$wheels")
    for wheel in "$1"/*.whl; do
        python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheel" "$tree"
    done
    tar -C "$tree" -cf - . | xz -9 -T2 >"$2.tmp"
    mv "$2.tmp" "$2"
}

if [ ! -s "$CARRY/site.tar.xz" ]; then
    # What `medgate serve` and bench/ import that the machine's image has not (KINDS.md's package list): grpcio,
    # numpy, opencv, onnxruntime, pillow, prometheus-client, anyio, h11, requests are taken from the machine.
    # protobuf travels too: medgate/v1's generated code needs a runtime at least as new as its own.
    mkdir "$wheels/site"
    download "$wheels/site" $(for p in pydicom highdicom pyjpegls pylibjpeg cryptography cffi grpcio-health-checking \
        grpcio-reflection tritonclient python-rapidjson pybase64 PyJWT starlette uvicorn protobuf; do pinned "$p"; done)
    pack "$wheels/site" "$CARRY/site.tar.xz"
fi
if [ ! -s "$CARRY/numpy1.tar.xz" ]; then
    mkdir "$wheels/numpy1"
    download "$wheels/numpy1" numpy==1.26.4
    pack "$wheels/numpy1" "$CARRY/numpy1.tar.xz"
fi
echo "$PYV" >"$CARRY/python-version"
ls -l "$CARRY"
du -sh "$CARRY"
