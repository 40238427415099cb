#!/usr/bin/env bash
# The GPU proof for a lent GPU machine: builds the engine in place (no package registry,
# nothing installed), runs the GPU and staging tests, then the GPU benchmark, and leaves
# a log, the test reports and a JSON of results in $OUT. Every phase has its own time
# limit; a failing phase is logged and the rest go on; the whole run stays under
# GPU_CHECK_BUDGET_S seconds (default 285).
#   OUT=/some/dir bench/gpu_check.sh
# Settings: PYTHON (python3), GPU_BENCH_SIZE_MB (4096), GPU_BENCH_DIR (bench/out/gpu-data,
# must be on the disk to measure, not tmpfs), GPU_CHECK_BUDGET_S, GPU_CHECK_PHASES (a
# comma-separated subset of environment,build,build-pip,smoke,tests-gpu,tests-staging,bench
# to run; the others are logged as skipped; default all).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/out/gpu}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET_S:-285}
SIZE_MB=${GPU_BENCH_SIZE_MB:-4096}
DATA=${GPU_BENCH_DIR:-$ROOT/bench/out/gpu-data}
START=$(date +%s)
PHASES=$OUT/phases.tsv
: >"$PHASES"
export ROOT PY OUT

left() { echo $((BUDGET - ($(date +%s) - START))); }

# phase NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, within what is left.
phase() {
  local name=$1 limit=$2
  shift 2
  if [[ -n ${GPU_CHECK_PHASES:-} && ",$GPU_CHECK_PHASES," != *",$name,"* ]]; then
    echo "=== $name: skipped, not in GPU_CHECK_PHASES"
    printf '%s\tskipped\t0\n' "$name" >>"$PHASES"
    return 1
  fi
  local l
  l=$(left)
  ((l - 5 < limit)) && limit=$((l - 5))
  if ((limit < 5)); then
    echo "=== $name: skipped, out of time"
    printf '%s\tskipped\t0\n' "$name" >>"$PHASES"
    return 1
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local t0 rc
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - t0))s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$PHASES"
  return $rc
}

environment() {
  echo "python: $PY"
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
    --format=csv 2>&1 | head -5
  "$PY" - <<'EOF'
import importlib, os, sys
print("python", sys.version.split()[0])
for m in ("torch", "numpy", "pybind11", "safetensors", "pytest", "nvidia.cufile"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", ""), getattr(mod, "__path__", [""])[0] if m == "nvidia.cufile" else "")
    except Exception as e:
        print(m, "MISSING:", e)
import torch
print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
EOF
  df -h "$ROOT" | tail -1
  findmnt -T "$ROOT" -o TARGET,FSTYPE,OPTIONS 2>/dev/null | tail -1
  nproc
  free -g | head -2
}

# In place: cmake builds the extension next to the sources; nothing is installed.
build() {
  local bdir=$ROOT/build/gpu-check gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$ROOT" -B "$bdir" ${gen[@]+"${gen[@]}"} -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
    cmake --build "$bdir" -j "$(nproc)" &&
    cp "$bdir"/_engine*.so "$ROOT/python/tensorfile/"
}

# If cmake cannot, pip builds a wheel from the tree (no registry: no isolation, no deps).
build_pip() {
  "$PY" -m pip install --no-build-isolation --no-deps --target "$ROOT/build/gpu-pip" "$ROOT" &&
    cp "$ROOT"/build/gpu-pip/tensorfile/_engine*.so "$ROOT/python/tensorfile/"
}

smoke() {
  "$PY" - <<'EOF'
import os
import tensorfile
from tensorfile import _cuda, _engine
print("tensorfile from", tensorfile.__file__)
if not tensorfile.__file__.startswith(os.environ["ROOT"]):
    print("WARNING: this is not the tensorfile built here; an installed copy shadows it")
print("cuda_available", tensorfile.cuda_available(), "libcudart", _engine.cuda_library() or _engine.cuda_error())
print("cufile", _cuda._load_cufile(), _engine.cufile_error(), _cuda._cufile_candidates())
EOF
}
# The figures the GPU path is judged by, from the benchmark's JSON: CPU seconds per GB
# moved (threads spinning on events show here), GPUDirect with and without registered
# buffers, and the GPU memory one load leaves in a fresh process (one context).
summary() {
  "$PY" - "$OUT/gpu_bench.json" <<'EOF'
import json, sys
rep = json.load(open(sys.argv[1]))
res = rep.get("results", {})
print("name\tGB/s\tCPU s per GB")
for name, r in sorted(res.items()):
    print(f"{name}\t{r['gbps']:.2f}\t{r.get('cpu_s_per_gb', float('nan')):.3f}")
for op in ("load", "save"):
    reg, unreg = res.get(f"tensorfile_{op}_gds"), res.get(f"tensorfile_{op}_gds_unregistered")
    if reg and unreg:
        print(f"gds {op}: registered {reg['gbps']:.2f} GB/s, unregistered {unreg['gbps']:.2f} GB/s")
print("memory after one load:", rep.get("memory_after_first_load", "not measured"))
EOF
}
export -f environment build build_pip smoke summary

export PYTHONPATH=$ROOT/python:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}
phase environment 30 bash -c environment
phase build 150 bash -c build || phase build-pip 150 bash -c build_pip
phase smoke 60 bash -c smoke
phase tests-gpu 100 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
  --junitxml="$OUT/tests_gpu.xml"
phase tests-staging 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_staging.py \
  --junitxml="$OUT/tests_staging.xml"
mkdir -p "$DATA"
phase bench $(($(left) - 20)) "$PY" bench/gpu_bench.py --size-mb "$SIZE_MB" --dir "$DATA" \
  --json "$OUT/gpu_bench.json" --budget-s $(($(left) - 35))
rm -rf "$DATA"
phase summary 15 bash -c summary
echo "=== phases (name, exit status, seconds):"
cat "$PHASES"
echo "=== total $(($(date +%s) - START))s; log $LOG"
exit 0
