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
        # 1) a torch wheel in pip's find-links (offline machines ship a CPU torch 2.13.0 there), installed
        #    alone first (--no-index --no-deps), then its dependencies from the usual indexes;
        # 2) PyTorch's CPU index. Never PyPI's default torch, which is the multi-GB CUDA build.
        if "${PIP[@]}" install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
            "${PIP[@]}" install -q "torch==2.13.0"
        else
            "${PIP[@]}" install torch --index-url https://download.pytorch.org/whl/cpu \
                --extra-index-url https://pypi.org/simple \
                || { echo "[bootstrap] could not install a CPU torch; install one by hand" >&2; exit 1; }
        fi
    fi
fi
"${PIP[@]}" install -q -e ".[dev]"
# Best effort: Debian's chromium for the test that opens the HTML report in a headless browser with networking
# off (it is skipped without one). Only as root with apt-get; REPINF_SKIP_APT=1 opts out; failures are ignored.
if [ "${REPINF_SKIP_APT:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[bootstrap] installing Debian chromium for the headless report test (REPINF_SKIP_APT=1 skips this)"
    if ! { timeout 600 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
        || { timeout 300 apt-get update -q >/dev/null 2>&1 \
            && timeout 600 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; then
        echo "[bootstrap] chromium not installed; the headless browser test will be skipped"
    fi
fi
"$VENV/bin/python" -c "import torch, repinf_lens; print('[bootstrap] torch', torch.__version__, '| repinf_lens', repinf_lens.__version__)"
