"""A model profile: how to load, sample from and train one model (the list lives in registry/).
Each field's help is what `python cli.py config show` prints."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


def knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelProfile:
    """How to load, sample from and train one model. Field values are the defaults a run uses."""

    name: str = field(metadata={"help": "profile name (set by --model)"})
    source: str = field(metadata={
        "help": "HF id, local path, or builtin:<name> for models the project builds itself"})
    description: str = field(metadata={"help": "what the profile is for"})
    backend: str = knob("hf", "hf (transformers + PEFT) or unsloth (CUDA only)")
    engine: str = knob("hf", "generation engine: hf (the project's sampling loop) or vllm "
                             "(vLLM in its own process; install: bash scripts/setup.sh --vllm)")
    tensor_parallel_size: int = knob(1, "GPUs one vLLM engine spans (tensor parallel; with "
                                        "--engine vllm; beyond one node vLLM runs on a Ray "
                                        "cluster, see docs/engines.md)")
    vllm_quantization: str = knob("", "vLLM's on-the-fly weight quantization for generation "
                                     "(e.g. fp8: 32B in 33 GB instead of 65 GB; with --engine "
                                     "vllm on a GPU); empty: the profile's dtype")
    load_in_4bit: bool = knob(False, "bitsandbytes 4-bit for generation and training (CUDA only)")
    dtype: str = knob("float32", "compute dtype; the merged model is saved in it (>= 16-bit)")
    needs_cuda: bool = knob(False, "refuse to run without a CUDA GPU")
    lora_r: int = knob(16, "LoRA rank")
    lora_alpha: int = knob(32, "LoRA alpha")
    lora_dropout: float = knob(0.0, "LoRA dropout")
    learning_rate: float = knob(5e-6, "DPO learning rate")
    beta: float = knob(0.1, "DPO beta (strength of the KL anchor to the reference)")
    epochs: int = knob(1, "DPO epochs over a stage's pairs")
    sft_weight: float = knob(0.0, "weight of the NLL term on chosen responses added to the DPO "
                                  "loss (RPO); 0: plain DPO")
    replay_share: float = knob(0.0, "rehearsal: earlier stages' kept pairs (this run's) added to a "
                                    "stage's DPO training, as a share of its own pairs, taken "
                                    "from each earlier stage in turn; 0: none")
    accelerate_config: str = knob("", "train under `accelerate launch --config_file FILE` in "
                                      "several processes (DDP, FSDP or DeepSpeed ZeRO-3; see "
                                      "configs/accelerate/ and docs/engines.md); empty: train "
                                      "in the stage's own process")
    train_batch_size: int = knob(2, "DPO per-device batch size")
    grad_accum: int = knob(1, "gradient accumulation steps")
    max_length: int = knob(768, "DPO max tokens per prompt + response")
    save_steps: int = knob(10, "checkpoint every N optimizer steps (resume point)")
    temperature_answer: float = knob(0.7, "sampling temperature for answers and revisions")
    temperature_critique: float = knob(0.3, "sampling temperature for critiques")
    top_p: float = knob(0.95, "nucleus sampling top-p")
    gen_batch_size: int = knob(8, "sequences generated per batch")
    max_new_tokens: int = knob(256, "new tokens per response")
    instruction_max_new_tokens: int = knob(48, "new tokens per generated instruction/question")
    judge_batch_size: int = knob(8, "judge prompts scored per batch")
    parity_tolerance: float = knob(
        1e-3, "merge check: max |log p_merged - log p_adapter| over probe next-token "
              "distributions")
    default_limit: int = knob(200, "training tasks per stage when --limit is not given")
    responses_per_task: int = knob(4, "samples per task (K) in the sampling stages")

    def with_source(self, source: str, name: str | None = None) -> "ModelProfile":
        return replace(self, source=source, name=name or self.name)
