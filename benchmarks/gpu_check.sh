#!/usr/bin/env bash
# The whole GPU check of issue #20 in one go: install, versions, the CuPy parity tests (tiny configs, then the
# full-size random checkpoint built on the device), and the GPU benchmark against transformers eager on the same
# GPU. Everything lands in OUT_DIR: one log per stage (NN_stage.log), pytest's JUnit XML, versions.json, the
# benchmark's gpu-h200.json, and summary.json (stage, status, exit code, seconds), rewritten after every stage
# so that a kill or a timeout keeps what was done.
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# Fail-soft: every stage runs under `timeout` and its failure is recorded, never fatal. The stages share one
# deadline (GPU_CHECK_BUDGET seconds, default 450, i.e. 7.5 min): a stage gets at most its own cap and never more
# than what is left, and a stage with under 15 s left is skipped. No downloads: pip installs with --no-deps.
#
# Settings (environment):
#   PYTHON=python3             the interpreter
#   GPU_CHECK_BUDGET=450       seconds for all the stages together
#   GPU_CHECK_SIZE=full        full: build the 1.66 B checkpoint (6.7 GB, benchmarks/cache/full-float32) for the
#                              full-size test and the benchmark; tiny: no full-size checkpoint, a tiny benchmark
#                              (for a dry run on a CPU machine)
#   GPU_CHECK_BACKEND=cupy     the benchmark's --backend (numpy lets a dry run exercise the benchmark stage)
#   GPU_CHECK_SKIP_INSTALL=1   leave the install out (a shared virtual environment; PYTHONPATH covers it)
#
# Stages and caps (s): 00_install 60, 01_versions 30, 02_cupy_tiny 120, 03_checkpoint 120, 04_cupy_full 100,
# 05_benchmark 200, 06_parity_on_cupy 120 (the whole tiny parity suite with KOSMOS2_BACKEND=cupy, last: it
# repeats on the device what 02 checks, over more cases, in whatever time is left).
#
# Dry run on the CPU (2 cores, one busy with other work; no GPU, no CuPy), with GPU_CHECK_SIZE=tiny
# GPU_CHECK_BACKEND=numpy GPU_CHECK_SKIP_INSTALL=1, 114 s in all: 00_install skipped; 01_versions 4 s (no
# nvidia-smi, no CuPy: recorded in versions.json); 02_cupy_tiny 5 s (5 tests skipped with the reason); 03 and 04
# skipped (tiny); 05_benchmark 90 s (the tiny benchmark on NumPy, both sides on the CPU); 06_parity_on_cupy 15 s
# (failed, as it must without CuPy: 10 BackendErrors, then --maxfail stops it). On the H200 (16 cores) expect the
# install and versions in seconds, 02 in under a minute (CuPy compiles each kernel once on a fresh machine), the
# full checkpoint in about a minute, 04 in well under its cap, and the benchmark in two to three minutes (mostly
# loading 6.7 GB, several times in fresh processes): 6-7 minutes in all, hence the 450 s budget.

set -u

OUT_DIR=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
SIZE=${GPU_CHECK_SIZE:-full}
BACKEND=${GPU_CHECK_BACKEND:-cupy}
LABEL=gpu-h200
[ "$SIZE" = full ] || LABEL=gpu-check-$SIZE
FULL_CKPT=$ROOT/benchmarks/cache/full-float32
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

START=$(date +%s)
SUMMARY=()

write_summary() {
    {
        printf '{\n  "script": "benchmarks/gpu_check.sh",\n  "size": "%s",\n  "backend": "%s",\n' "$SIZE" "$BACKEND"
        printf '  "budget_s": %s,\n  "elapsed_s": %s,\n  "stages": [' "$BUDGET" "$(($(date +%s) - START))"
        local i sep=""
        for i in "${SUMMARY[@]+"${SUMMARY[@]}"}"; do
            printf '%s\n    %s' "$sep" "$i"
            sep=","
        done
        printf '\n  ]\n}\n'
    } >"$OUT_DIR/summary.json.tmp" && mv "$OUT_DIR/summary.json.tmp" "$OUT_DIR/summary.json"
}

record() {  # name status rc seconds
    SUMMARY+=("{\"stage\": \"$1\", \"status\": \"$2\", \"rc\": $3, \"seconds\": $4, \"log\": \"$1.log\"}")
    write_summary
    printf '== %-20s %-8s rc=%-4s %4ss\n' "$1" "$2" "$3" "$4"
}

# stage NAME CAP CMD...: run CMD under the smaller of CAP and the time left, output to OUT_DIR/NAME.log
stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        echo "skipped: ${left}s of the ${BUDGET}s budget left" >"$OUT_DIR/$name.log"
        record "$name" skipped 0 0
        return
    fi
    local t0 rc status
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee "$OUT_DIR/$name.log"
    # through bash -c so that a stage may be one of the (exported) functions below
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >>"$OUT_DIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" "$rc" "$(($(date +%s) - t0))"
}

skip() {  # name reason
    echo "skipped: $2" >"$OUT_DIR/$1.log"
    record "$1" skipped 0 0
}

# pytest-timeout (on the GPU machine) stops one hung test instead of the whole stage
PYTEST=("$PY" -m pytest -p no:cacheprovider -s -rA)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(--timeout=90); fi

versions() {
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" - "$OUT_DIR/versions.json" <<'EOF'
import json, platform, sys
v = {"python": platform.python_version()}
for name in ("numpy", "cupy", "torch", "transformers", "safetensors", "tokenizers"):
    try:
        v[name] = __import__(name).__version__
    except Exception as exc:
        v[name] = f"not importable: {type(exc).__name__}: {exc}"
try:
    import torch
    v["torch.version.cuda"] = torch.version.cuda
    v["torch.cuda.is_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
except Exception as exc:
    v["torch.cuda"] = f"{type(exc).__name__}: {exc}"
try:
    import cupy
    v["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    v["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    v["cupy_devices"] = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:
    v["cupy.cuda"] = f"{type(exc).__name__}: {exc}"
from kosmos2_ref.backend import cupy_available
v["cupy_backend"] = cupy_available()[1] or "available"
print(json.dumps(v, indent=1))
json.dump(v, open(sys.argv[1], "w"), indent=1)
EOF
    "$PY" -c "import cupy; cupy.show_config()" 2>&1 | head -40
}

build_checkpoint() {
    "$PY" -c "
import sys, time
sys.path.insert(0, 'benchmarks')
import compare
t0 = time.perf_counter()
print('checkpoint:', compare.checkpoint('full'), f'{time.perf_counter() - t0:.1f} s')
"
}

benchmark() {
    "$PY" benchmarks/compare.py --size "$SIZE" --backend "$BACKEND" --repeats 3 --new-tokens 64 --label "$LABEL" \
        --out "$OUT_DIR/$LABEL.json" || return
    # the full-size GPU result also goes where the docs read results from (commit it from the GPU session)
    if [ "$SIZE" = full ]; then cp "$OUT_DIR/$LABEL.json" "benchmarks/results/$LABEL.json"; fi
}

export -f versions build_checkpoint benchmark
export PY OUT_DIR SIZE BACKEND LABEL

echo "gpu_check: $ROOT -> $OUT_DIR (budget ${BUDGET}s, size $SIZE, backend $BACKEND)"
write_summary

if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    skip 00_install "GPU_CHECK_SKIP_INSTALL=1"
else
    stage 00_install 60 "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
stage 01_versions 30 versions
stage 02_cupy_tiny 120 "${PYTEST[@]}" -m "not slow" tests/parity/test_cupy.py --junitxml="$OUT_DIR/02_cupy_tiny.xml"
if [ "$SIZE" = full ]; then
    stage 03_checkpoint 120 build_checkpoint
    if [ -f "$FULL_CKPT/config.json" ]; then
        stage 04_cupy_full 100 env KOSMOS2_FULL_CHECKPOINT="$FULL_CKPT" "${PYTEST[@]}" -m slow \
            tests/parity/test_cupy.py --junitxml="$OUT_DIR/04_cupy_full.xml"
    else
        skip 04_cupy_full "no full-size checkpoint (see 03_checkpoint.log)"
    fi
else  # (without the folder, the full-size test's fixture would build a 6.7 GB checkpoint of its own)
    skip 03_checkpoint "GPU_CHECK_SIZE=$SIZE"
    skip 04_cupy_full "GPU_CHECK_SIZE=$SIZE"
fi
stage 05_benchmark 200 benchmark
# Tests whose reference differs between transformers releases, not our numbers: with transformers 5.17 (what the
# GPU machine has; the project pins 5.23) run on the CPU here, test_interpolate_pos_encoding's image embeddings
# differ from ours by 0.25-0.42 (of 1.2) and test_sdpa_reference_agrees' left-padded SDPA logits by 7.4 (of 20),
# while every other test of these two files passes. They are left out unless transformers is 5.23.
OTHER_RELEASE=()
if ! "$PY" -c "import transformers, sys; sys.exit(transformers.__version__ != '5.23.0')" 2>/dev/null; then
    OTHER_RELEASE=(-k "not test_interpolate_pos_encoding and not test_sdpa_reference_agrees")
fi
stage 06_parity_on_cupy 120 env KOSMOS2_BACKEND=cupy "${PYTEST[@]}" --maxfail=10 -m "not slow" "${OTHER_RELEASE[@]}" \
    tests/parity/test_model_parity.py tests/parity/test_generation_parity.py --junitxml="$OUT_DIR/06_parity_on_cupy.xml"

write_summary
echo "gpu_check: done in $(($(date +%s) - START))s; summary in $OUT_DIR/summary.json"
