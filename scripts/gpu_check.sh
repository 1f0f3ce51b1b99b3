#!/usr/bin/env bash
# The GPU checks of the fast paths, in one go (sized for about 5 minutes on one H100/H200; not yet run on one):
#   1. tests/test_cuda.py on the GPU: the Triton kernels against the step's definition, every
#      optimizer's default path against the CPU reference, checkpoints between CUDA and CPU,
#      bf16 state, a compiled step, no host synchronisation between refreshes;
#   2. the step-time table on the GPU (python -m snsm.bench.speed --device cuda), LLaMA-20M and -60M.
# Needs a python3 with a CUDA build of torch, Triton, pytest and tqdm; runs from the source tree
# (no install). Writes its logs and tables to $OUT (default results/gpu). Each part runs even if
# the one before failed; the exit status is that of the tests.
#
#   bash scripts/gpu_check.sh            # OUT=results/gpu
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")' || exit 2
{
  nvidia-smi -L
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
            "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/env.txt"

"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
tests=$?

"$PY" -m snsm.bench.speed --device cuda --models llama_20m,llama_60m \
  --optimizers "AdamWSN,AdamWSN compiled,AdamWSN reference,AdamWSNSM,AdamWSNSM compiled,AdamWSNSM synchronized,AdamWSNSM randomized,SGDSM,SM matmuls via torch.mm" \
  --out "$OUT" 2>&1 | tee "$OUT/speed.log"
exit $tests
