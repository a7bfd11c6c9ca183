#!/usr/bin/env bash
# On the lent GPU machine, 3B-shaped bfloat16 weights:
#   bash benchmarks/gpu.sh          decode speed, keras-hub beside it (gpu_decode.py)
#   bash benchmarks/gpu.sh train    a LoRA training step, examples/s and MFU (gpu_train.py)
#   bash benchmarks/gpu.sh plan     the memory planner against peak device memory (gpu_plan.py)
#   bash benchmarks/gpu.sh fit      issue 17's run (about 6 minutes): LoRA steps of pg2_3b_224 bf16 and
#                                   pg2_10b_224 int4 at batch 8 (remat, loss in chunks of 128), then decode
#                                   at batch 1 and 16
# That machine has JAX but not Keras: first, here, put the wheels in .whl/
# (ignored by git) and carry them:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
#     keras==3.15.1 keras-hub==0.32.0 namex optree kagglehub kagglesdk
# then run `bash benchmarks/gpu.sh` there with `.whl` carried.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${1:-decode}" = plan ]; then
  for run in "inference 16" "full 8"; do
    python3 -m benchmarks.gpu_plan $run 2>&1 | tee -a "${OUT:-/tmp}/gpu_plan.log"
  done
elif [ "${1:-decode}" = fit ]; then
  log="${OUT:-/tmp}/gpu_fit.log"
  for run in "--preset pg2_3b_224" "--preset pg2_10b_224 --quantization int4"; do
    python3 -m benchmarks.gpu_train $run --batches 8 --steps 5 --remat --loss-chunk-size 128 \
      2>&1 | tee -a "$log"
  done
  python3 -m benchmarks.gpu_decode --batches 1 16 2>&1 | tee -a "$log"
elif [ "${1:-decode}" = train ]; then
  shift
  python3 -m benchmarks.gpu_train --batches 8 32 "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_train.log"
else
  [ "${1:-}" = decode ] && shift
  python3 -m benchmarks.gpu_decode --batches 1 16 --peer "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_decode.log"
fi
