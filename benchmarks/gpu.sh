#!/usr/bin/env bash
# Decode speed of 3B-shaped bfloat16 weights on the lent GPU machine, with
# keras-hub's model beside it (benchmarks/gpu_decode.py says what is timed).
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
python3 benchmarks/gpu_decode.py --batches 1 16 --peer "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_decode.log"
