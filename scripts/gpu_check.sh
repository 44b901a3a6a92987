#!/usr/bin/env bash
# What issue 5 (Triton kernels, CUDA-graph decode) needs a GPU for, in one command:
#
#   bash scripts/gpu_check.sh [OUTDIR [STEP ...]]   # OUTDIR defaults to $OUT, else ./gpu-check
#
# STEPs (default: all, in this order): gpu_tests recurrent_kernels tune bench_kernels
# bench_recurrent bench_resident bench_offload. Where one command may run only 10 minutes
# (the lent H200), split it:
#   bash scripts/gpu_check.sh "$OUT" gpu_tests recurrent_kernels tune
#   bash scripts/gpu_check.sh "$OUT" bench_kernels bench_recurrent bench_resident bench_offload
#
# 1. the GPU test tier (-m gpu): every kernel against its torch reference at real shapes
#    (Mixtral 4096x14336, Qwen3 2048x768, odd sizes), captured decode steps against eager
#    decode, whole-model logits and greedy tokens on the GPU against the CPU reference;
#    recurrent_kernels: every recurrent-layer kernel (tests/test_recurrent_kernels.py, the
#    tests the CPU runs under the interpreter) compiled for this GPU;
# 2. tune_kernels.py: tile sizes for this GPU, written to moerun/kernels/configs/ (copied
#    to OUTDIR to be committed);
# 3. bench_kernels.py: copy bandwidth, the decode kernel's share of it, bitsandbytes' 4-bit
#    path side by side, the prefill grouped GEMM against a bf16 dense matmul;
#    bench_recurrent.py: the recurrent kernels (prompt and decode step) against the torch
#    paths at Qwen3.5 / Granite 4.0-H / Jamba shapes, T = 512, 2048, 8192;
# 4. moerun bench on Mixtral-8x7B shapes (8 layers, synthetic weights), 4-bit, fully
#    resident and with a 12 GiB-like budget, decode with and without CUDA graphs.
#
# bitsandbytes is not on the lent H200: carry it as a wheel in .whl/ (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# Every step runs even if one before it failed; the exit status says whether all passed.
set -u
OUT_DIR=${1:-${OUT:-gpu-check}}
shift || true
STEPS=${*:-gpu_tests recurrent_kernels tune bench_kernels bench_recurrent bench_resident bench_offload}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # moerun from this checkout, uninstalled

failed=0
step() {  # step NAME COMMAND...: run if asked for, log to OUTDIR/NAME.log, keep going on failure
  local name=$1
  shift
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT_DIR/$name.log"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/gpu.txt"

step gpu_tests "$PY" -m pytest -q -m gpu tests/test_kernels.py tests/test_graphs.py tests/test_recurrent_kernels.py -p no:cacheprovider
step recurrent_kernels "$PY" -m pytest -q tests/test_recurrent_kernels.py -p no:cacheprovider
step tune "$PY" scripts/tune_kernels.py --quick
case " $STEPS " in *" tune "*) cp moerun/kernels/configs/*.json "$OUT_DIR/" 2>/dev/null ;; esac
step bench_kernels "$PY" scripts/bench_kernels.py --out "$OUT_DIR/bench_kernels.json" --md "$OUT_DIR/bench_kernels.md"
step bench_recurrent "$PY" scripts/bench_recurrent.py --out "$OUT_DIR/bench_recurrent.json" --md "$OUT_DIR/bench_recurrent.md"
step bench_resident "$PY" -m moerun bench --synthetic mixtral-8x7b --layers 8 --bits 4 -p 512 -n 64 -r 2 \
  --cuda-graphs on,off -o json
step bench_offload "$PY" -m moerun bench --synthetic mixtral-8x7b --layers 8 --bits 4 --expert-slots 4 -p 512 -n 64 -r 2 \
  --cuda-graphs on,off -o json
exit $failed
