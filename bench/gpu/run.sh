#!/usr/bin/env bash
# The GPU-machine check of issue 15 item 7: one prepared script, about 4 minutes on a 16-core machine.
#
#   1. diagnose  Why did Python-backend models answer with empty tensors there? tritonserver on two diagnostic
#                models (bench/gpu/probe_models), once with the machine's python3 first on PATH (numpy 2.x) and
#                once with a numpy-1.26 environment first; each model reports the numpy, sys.executable, torch
#                and CUDA it saw; numpy_probe answers through pb_utils.Tensor(numpy), dlpack_probe through
#                Tensor.from_dlpack(torch tensor on CUDA). -> diagnose.json
#   2. scaling   Gateway workers 1, 2, 4, 8 at 16 calls in flight, Classify on a 1024x1024 PNG, against the
#                classifier called directly, Triton's stubs on the python3 that step 1 found correct.
#                -> scaling.json
#   3. torch     The same with the classifier's production PyTorch runtime on CUDA (config.pbtxt parameter
#                runtime: torch, triton_models/medgate_torch_nets.py: the served model.onnx's weights), on the
#                python3 the scaling step uses, workers 1, 4, 8. -> scaling_torch.json
#
# On the device machine (after bench/gpu/prepare.sh here; build/gpu-carry travels as a carried path):
#   bash bench/gpu/run.sh                      results in $OUT (else build/gpu-out)
# Here, on the CPU machine, the same steps at small sizes with the local .venv and wheel:
#   bash bench/gpu/run.sh --cpu-smoke [OUTDIR] [--steps diagnose,scaling]
# Every step's exit status and output tail go to run.log; a failed step does not stop the next; the script exits
# non-zero when any step failed. Logs of every server: logs.tar.gz. Nothing here changes the GPU's settings.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
REPO=$(pwd)
MODE=device
STEPS=diagnose,scaling,torch
OUTDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
    --cpu-smoke) MODE=smoke ;;
    --steps) STEPS=$2; shift ;;
    --steps=*) STEPS=${1#--steps=} ;;
    -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
    *) OUTDIR=$1 ;;
    esac
    shift
done
OUTDIR=${OUTDIR:-${OUT:-$REPO/build/gpu-out}}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d /tmp/medgate-gpu-XXXXXX)
LOGS=$WORK/logs
mkdir -p "$LOGS"
RUNLOG=$OUTDIR/run.log
: >"$RUNLOG"
STARTED=$(date +%s)
FAILED=()

log() { echo "[$(($(date +%s) - STARTED)) s] $*" | tee -a "$RUNLOG"; }
wanted() { [[ ",$STEPS," == *",$1,"* ]]; }
# The whole run stays inside BUDGET seconds (the device tool stops a command at 600 s, and then returns only what
# is already in $OUT): each step's limit shrinks to what is left, 25 s kept for packing the logs.
BUDGET=${GPU_CHECK_BUDGET_S:-570}
step() { # NAME SECONDS COMMAND...: run it with a time limit, its output in $LOGS/NAME.out, its tail in run.log
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - 25 - ($(date +%s) - STARTED)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        FAILED+=("$name (no time left)")
        log "!! $name skipped: no time left in the ${BUDGET} s budget"
        return 124
    fi
    log "== $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.out" 2>&1
    local rc=$?
    tail -n 20 "$LOGS/$name.out" | tee -a "$RUNLOG"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ': time limit'))")
        log "!! $name failed with exit $rc"
    else
        log "ok $name"
    fi
    return "$rc"
}
finish() {
    # Logs, each cut to its last MB (a stub stuck in a loop writes without end), in one archive: the device
    # tool returns 8 files at most.
    for f in "$LOGS"/*; do
        [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 1000000 ] && { tail -c 1000000 "$f" >"$f.cut" && mv "$f.cut" "$f"; }
    done
    tar -C "$WORK" -czf "$OUTDIR/logs.tar.gz" logs 2>/dev/null
    log "results in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
    if [ ${#FAILED[@]} -gt 0 ]; then
        log "FAILED: ${FAILED[*]}"
    else
        log "all steps passed"
    fi
    rm -rf "$WORK"
}
trap finish EXIT

if [ "$MODE" = smoke ]; then
    PY=$REPO/.venv/bin/python
    PYBIN=$REPO/.venv/bin
    SERVER_DIR=$("$PY" -c "from services.triton.embedded import pytriton_server_dir; print(pytriton_server_dir())") || exit 2
    VARIANTS=(--variant "venv=$PYBIN")
    # A python3 with numpy 2 beside the venv (outside it on PATH) reproduces the fault here: its own venv,
    # system site-packages visible, as the device's python3 is a venv.
    other=$(PATH=$(echo "$PATH" | tr ':' '\n' | grep -v "^$PYBIN\$" | paste -sd:) command -v python3 || true)
    if [ -n "$other" ] && "$other" -c "import sys, numpy; sys.exit(int(numpy.__version__.split('.')[0]) < 2)" 2>/dev/null &&
        [ "$("$other" -c 'import sys; print(sys.version_info[:2])')" = "$("$PY" -c 'import sys; print(sys.version_info[:2])')" ] &&
        "$other" -m venv --system-site-packages --without-pip "$WORK/numpy2" 2>>"$RUNLOG"; then
        VARIANTS+=(--variant "numpy2=$WORK/numpy2/bin")
    fi
    SCALING_ARGS=(--workers 1 2 --clients 4 --seconds 2 --load-processes 2 --instances 1)
    TORCH_ARGS=(--workers 1 --clients 2 --seconds 2 --load-processes 1 --instances 1)
    DIAGNOSE_LIMIT=120
else
    PY=${GPU_CHECK_PYTHON:-$(command -v python3)}
    PYBIN=$(dirname "$PY")
    CARRY=$REPO/build/gpu-carry
    for f in triton.tar.xz site.tar.xz numpy1.tar.xz; do
        if [ ! -s "$CARRY/$f" ]; then
            log "no $CARRY/$f: run bench/gpu/prepare.sh on the CPU machine first and carry build/gpu-carry"
            FAILED+=("carry")
            exit 2
        fi
    done
    step machine 60 bash -c 'date -u; echo "cores: $(nproc)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
        echo "python3: $1"; "$1" -c "import sys; print(sys.version)"
        "$1" -m pip list 2>/dev/null | grep -i -E "^(numpy|torch|onnxruntime|grpcio|protobuf|opencv|pillow|anyio|h11|prometheus|cryptography) "
        free -g | head -2' _ "$PY"
    # Python's tarfile, not tar -J: the image need not have the xz program.
    untar() { "$PY" -c 'import sys, tarfile; t = tarfile.open(sys.argv[1]); getattr(tarfile, "tar_filter", None) and setattr(t, "extraction_filter", tarfile.tar_filter); t.extractall(sys.argv[2])' "$1" "$2"; }
    step unpack 180 bash -c "$(declare -f untar); PY='$PY'; untar '$CARRY/triton.tar.xz' '$WORK/tsite' && untar '$CARRY/site.tar.xz' '$WORK/site' && ls '$WORK/tsite/pytriton/tritonserver/bin'" || exit 2
    SERVER_DIR=$WORK/tsite/pytriton/tritonserver
    PYV=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    STUB=$SERVER_DIR/python_backend_stubs/$PYV/triton_python_backend_stub
    # The stub links libpython$PYV.so.1.0; where the machine's Python keeps it off the loader's path, add its folder.
    if ldd "$STUB" 2>/dev/null | grep -q "libpython.*not found"; then
        libdir=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
        found=$(ls "$libdir/libpython$PYV.so.1.0" 2>/dev/null ||
            timeout 60 find / -xdev -name "libpython$PYV.so.1.0" 2>/dev/null | head -1)
        [ -n "$found" ] && export LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
    log "stub for Python $PYV: $(ldd "$STUB" 2>&1 | grep -E 'libpython|not found' | tr -s ' \t' ' ' | paste -sd';')"

    # The numpy-1.26 environment: a venv of the machine's python3 holding numpy 1.26 first, then (a .pth line) the
    # machine's own site-packages, so torch, onnxruntime and the rest stay importable.
    make_numpy1() {
        "$PY" -m venv --without-pip "$WORK/np1" || {
            mkdir -p "$WORK/np1/bin" && ln -sf "$(readlink -f "$PY")" "$WORK/np1/bin/python3" &&
                printf 'home = %s\ninclude-system-site-packages = false\nversion = %s\n' \
                    "$(dirname "$(readlink -f "$PY")")" "$PYV" >"$WORK/np1/pyvenv.cfg"
        }
        local sp
        sp=$("$WORK/np1/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
        mkdir -p "$sp" && untar "$CARRY/numpy1.tar.xz" "$sp" || return 1
        "$PY" -c 'import site; print("\n".join(site.getsitepackages()))' >"$sp/zz-machine-site.pth"
        "$WORK/np1/bin/python3" -c 'import sys, numpy; print("np1:", numpy.__version__, numpy.__file__, sys.prefix)' &&
            "$WORK/np1/bin/python3" -c 'import onnxruntime; print("onnxruntime", onnxruntime.__version__, "with numpy 1.26")'
    }
    VARIANTS=(--variant "machine=$PYBIN")
    step numpy1_env 120 bash -c "$(declare -f untar make_numpy1); PY='$PY' PYV='$PYV' WORK='$WORK' CARRY='$CARRY' make_numpy1" &&
        VARIANTS+=(--variant "numpy1=$WORK/np1/bin")
    export PYTHONPATH=$WORK/site:$REPO
    step imports 120 "$PY" -c "import bench.gpu.scaling, bench.bench_gateway, services.gateway.server, clients.cli; print('gateway imports ok')"
    SCALING_ARGS=(--workers 1 2 4 8 --clients 16 --seconds 12 --load-processes 4 --instances 4 --threads 2)
    TORCH_ARGS=(--workers 1 4 8 --clients 16 --seconds 10 --load-processes 4 --instances 2)
    DIAGNOSE_LIMIT=240
fi

if wanted diagnose; then
    # Standard library only: no PYTHONPATH needed, the report comes even when nothing else imports.
    step diagnose "$DIAGNOSE_LIMIT" env -u PYTHONPATH "$PY" "$REPO/bench/gpu/diagnose.py" --server-dir "$SERVER_DIR" \
        "${VARIANTS[@]}" --probe-torch --out "$OUTDIR/diagnose.json" --logs "$LOGS"
fi

if wanted scaling; then
    # The stubs' python3: the first variant whose numpy_probe answered correctly (the classifier makes its outputs
    # the same way); without a diagnosis, the machine's own.
    CHOSEN=$PYBIN
    if [ -s "$OUTDIR/diagnose.json" ]; then
        CHOSEN=$("$PY" -c '
import json, sys
report = json.load(open(sys.argv[1]))
good = [v["path_first"] for v in report["variants"] if v.get("models", {}).get("numpy_probe", {}).get("ok")]
print(good[0] if good else "")' "$OUTDIR/diagnose.json")
    fi
    if [ -z "$CHOSEN" ]; then
        log "!! scaling skipped: no python3 gave correct numpy outputs in the diagnosis (see diagnose.json)"
        FAILED+=("scaling (skipped)")
    else
        log "scaling with the stubs on $CHOSEN/python3"
        step scaling 420 "$PY" -m bench.gpu.scaling --server-dir "$SERVER_DIR" --python-bin "$CHOSEN" \
            --out "$OUTDIR/scaling.json" --logs "$LOGS" "${SCALING_ARGS[@]}"
    fi
fi

if wanted torch; then
    # The stubs' python3: the first variant whose numpy_probe answered correctly and that imported torch (the
    # production model reads and answers through numpy as the ONNX one does, and needs torch).
    TORCH_BIN=$PYBIN
    if [ -s "$OUTDIR/diagnose.json" ]; then
        TORCH_BIN=$("$PY" -c '
import json, sys
report = json.load(open(sys.argv[1]))
probes = [(v["path_first"], v.get("models", {}).get("numpy_probe", {})) for v in report["variants"]]
good = [path for path, probe in probes if probe.get("ok") and probe.get("model_report", {}).get("torch", {}).get("version")]
print(good[0] if good else "")' "$OUTDIR/diagnose.json")
    fi
    if [ -z "$TORCH_BIN" ]; then
        log "!! torch skipped: no python3 gave correct numpy outputs with torch importable in the diagnosis (see diagnose.json)"
        FAILED+=("torch (skipped)")
    else
        log "torch classifier with the stubs on $TORCH_BIN/python3"
        step torch 300 "$PY" -m bench.gpu.scaling --runtime torch --server-dir "$SERVER_DIR" --python-bin "$TORCH_BIN" \
            --out "$OUTDIR/scaling_torch.json" --logs "$LOGS" "${TORCH_ARGS[@]}"
    fi
fi

if [ -s "$OUTDIR/diagnose.json" ]; then
    log "diagnosis: $("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["summary"])' "$OUTDIR/diagnose.json")"
fi
[ ${#FAILED[@]} -eq 0 ]
