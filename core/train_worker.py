"""One process of a DPO run under `accelerate launch` (profile.accelerate_config).

    python -m accelerate.commands.launch --config_file CONFIG -m core.train_worker JOB.json

`core.dpo.train_dpo_launched` writes JOB.json (model path, profile, DPO settings, pairs file,
output folders) and runs this in as many processes as CONFIG asks for (DDP, FSDP or DeepSpeed
ZeRO-3 on GPUs; several gloo processes on a CPU). Every process loads the model and trains its
share of each batch; rank 0 writes the adapter and the metrics (core.dpo.train_dpo).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from core.backend import HFBackend
from core.dpo import DPOSettings, train_dpo
from core.guards import TemplateGuard
from core.io import read_json, read_jsonl
from core.profile import ModelProfile


def device_map_for_this_process():
    """Where this process loads the model: its own GPU under DDP; nowhere fixed under FSDP or
    ZeRO-3 (accelerate shards it); the CPU without CUDA."""
    if not torch.cuda.is_available():
        return None
    sharded = any(os.environ.get(flag, "").lower() == "true"
                  for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    if sharded:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return {"": local_rank}


def main(job_path: str) -> None:
    job = read_json(Path(job_path))
    profile = ModelProfile(**job["profile"])
    torch.manual_seed(0)
    backend = HFBackend.load(job["model_path"], profile,  # check_accelerate_config: hf only
                             device_map=device_map_for_this_process())
    train_dpo(backend, read_jsonl(Path(job["pairs"])), DPOSettings(**job["settings"]),
              Path(job["work_dir"]), Path(job["adapter_dir"]), TemplateGuard(backend.tokenizer),
              report_to=tuple(job["report_to"]), run_name=job["run_name"])


if __name__ == "__main__":
    main(sys.argv[1])
