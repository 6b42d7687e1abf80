#!/usr/bin/env bash
# Create the project venv and install pocketgpt into it (editable, with dev extras).
#   PYTHON  interpreter used to create the venv (default: python3)
#   VENV    venv directory (default: .venv)
# torch is installed first, on its own, so that the project's loose "torch>=2.2"
# is already satisfied and pip never pulls a multi-GB CUDA build by accident.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo ">> creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if "$PY" -c 'import torch' >/dev/null 2>&1; then
    echo ">> torch already installed: $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo ">> GPU found: installing default (CUDA) torch"
    "$PY" -m pip install torch
elif "$PY" -m pip install 'torch==2.13.0'; then
    # On the project machines this resolves to a local CPU wheel.
    echo ">> installed torch 2.13.0"
else
    echo ">> torch==2.13.0 unavailable: installing CPU torch from the PyTorch index"
    "$PY" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
fi

echo ">> installing pocketgpt (editable, dev extras)"
"$PY" -m pip install -e '.[dev]'

touch "$VENV/.installed"
echo ">> done"
