#!/usr/bin/env bash
# Create or reuse the project virtualenv, idempotently, without ever pulling a CUDA torch on a CPU-only machine.
# Usage: tools/bootstrap.sh [VENV_DIR]
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        echo "[bootstrap] GPU found: installing the default (CUDA) torch build"
        "${PIP[@]}" install torch
    else
        echo "[bootstrap] no GPU: installing a CPU-only torch build"
        # 1) a CPU wheel in pip's find-links (offline machines ship torch 2.13.0 there);
        # 2) PyTorch's CPU index; 3) nothing else: never fall through to PyPI's CUDA build.
        "${PIP[@]}" install --no-index "torch==2.13.0" 2>/dev/null \
            || "${PIP[@]}" install torch --index-url https://download.pytorch.org/whl/cpu \
            || { echo "[bootstrap] could not install a CPU torch; install one by hand" >&2; exit 1; }
    fi
fi
"${PIP[@]}" install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch, repinf_lens; print('[bootstrap] torch', torch.__version__, '| repinf_lens', repinf_lens.__version__)"
