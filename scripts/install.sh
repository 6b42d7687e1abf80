#!/usr/bin/env bash
# Create the project venv and install pocketgpt into it (editable):
#   scripts/install.sh [runtime|dev|bench]
#     runtime (default)  torch and the server's dependencies only: what `make serve` needs
#     dev                runtime + the `dev` extra (pytest, ruff, playwright, transformers, ...): `make test`
#     bench              runtime + the `bench` extra (transformers, matplotlib): `make bench`
#   PYTHON  interpreter used to create the venv (default: python3)
#   VENV    venv directory (default: .venv)
# On success it writes the stamp $VENV/.installed-MODE (dev and bench also write .installed-runtime, which they
# include); the Makefile reruns this script when pyproject.toml or this script is newer than the stamp.
# torch is installed first, on its own, so that the project's loose "torch>=2.4" is already satisfied
# and pip never pulls a multi-GB CUDA build by accident.
set -euo pipefail

cd "$(dirname "$0")/.."
MODE="${1:-runtime}"
case "$MODE" in
    runtime) TARGET="." ;;
    dev | bench) TARGET=".[$MODE]" ;;
    *) echo "usage: scripts/install.sh [runtime|dev|bench]" >&2; exit 2 ;;
esac
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

echo ">> installing pocketgpt (editable, $MODE: $TARGET)"
"$PY" -m pip install -e "$TARGET"

rm -f "$VENV/.installed"  # the single stamp of earlier versions, which did not say what it stood for
touch "$VENV/.installed-runtime" "$VENV/.installed-$MODE"
echo ">> done ($MODE)"
