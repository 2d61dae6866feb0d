#!/usr/bin/env bash
# GPU smoke test: stage 1 end to end on the tiny model on one NVIDIA GPU, in bfloat16, with the
# transformers backend (generation, the A/B judge, DPO, merge and its parity check, assessment),
# then a table of each step's seconds. Needs no network: the tiny model is built locally.
#
#   bash scripts/gpu_smoke.sh                     # uses .venv (bash scripts/runpod_setup.sh)
#   WHEELS=/path/to/wheels bash scripts/gpu_smoke.sh   # first installs the project offline from
#                                                 # a folder of wheels (pip download -d ...)
#
# Prints the GPU, the torch and CUDA versions, the run's step table and the merge parity; exits
# non-zero on any failure. About 3-5 minutes, most of it start-up and the baseline suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${WHEELS:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --no-index --find-links "$WHEELS" -e ".[dev]"
fi
PY=${PYTHON:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/gpu-smoke-$(date +%Y%m%d-%H%M%S)}
"$PY" - <<'PYEOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_smoke: no CUDA GPU visible to torch (torch %s)" % torch.__version__)
print(f"gpu: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible), "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
PYEOF
started=$(date +%s)
# The tiny model in bfloat16: the merge's parity tolerance is the bf16 profile's (0.05), not
# the float32 one's (1e-4). --no-eval-sets when the shared data is absent.
data_flag=()
[ -d ../shared/data ] || data_flag=(--no-eval-sets)
"$PY" cli.py stage run 1 --model tiny-qwen2 --limit 8 --heldout 8 --baseline-limit 2 \
  --run-dir "$RUN_DIR" --set profile.dtype=bfloat16 --set profile.parity_tolerance=0.05 \
  "${data_flag[@]}"
echo "stage 1 on the GPU: $(( $(date +%s) - started )) s in all"
"$PY" cli.py status --run-dir "$RUN_DIR"
"$PY" - "$RUN_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
stage = Path(sys.argv[1]) / "stage_1"
metrics = json.loads((stage / "metrics.json").read_text())
merge = metrics["merge"]
print(f"pairs kept {metrics['funnel']['pairs_kept']}, DPO steps {metrics['dpo']['steps']}, "
      f"merge parity: max |d log p| {merge['max_abs_logprob_diff']:.2e} (tolerance "
      f"{merge['tolerance']}, {merge['dtype']}, {merge['probes']} probes)")
PYEOF
