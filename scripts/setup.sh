#!/usr/bin/env bash
# Create .venv and install the CPU stack (idempotent). On a GPU host use scripts/runpod_setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The local CPU build of torch first: a bare `torch` would pull several GB of CUDA wheels.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev,tracking]"
# `bash scripts/setup.sh --vllm` (or VLLM=1) also creates .venv-vllm for `--engine vllm`.
if [ "${1:-}" = "--vllm" ] || [ "${VLLM:-0}" = 1 ]; then bash scripts/setup_vllm.sh; fi
