#!/usr/bin/env bash
# The GPU checks of issue 14, section 3, as one script for a lent CUDA machine (run from the
# repository root; PYTHON defaults to python3 and must have a CUDA build of vLLM):
#   1. taps fire under CUDA-graph replay and equal eager mode, the host ring is pinned, and
#      at a sampling level below 1 the kept rows equal eager mode's with no host-device sync
#      in Drain.collect (tests/test_probe_cuda.py, tiny model, two engines)
#   2. the overhead benchmark on the 8B dummy with vLLM's default full CUDA graphs
# Results go to $OUT (default benchmarks/results), named by the GPU.
set -euo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PYTHON" -c "import torch, vllm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'vllm', vllm.__version__)"
PYTHONPATH=$PWD timeout 900 "$PYTHON" -m pytest -q -x tests/test_probe_cuda.py 2>&1 | tee "$OUT/probe-cuda-test.log"
PYTHONPATH=$PWD timeout 1800 "$PYTHON" -m benchmarks.overhead --model dummy --dummy-size 8b \
    --rounds "${ROUNDS:-3}" --output "$OUT/overhead-gpu-8b.json" 2>&1 | tee "$OUT/overhead-gpu-8b.log"
