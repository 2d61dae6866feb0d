"""What a stage needs while it runs: its folder, its input model, settings, guard and logger."""
from __future__ import annotations

import gc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.backend import HFBackend, SamplingSettings, load_backend
from core.constitution import Constitution
from core.generation import GenRequest, generate_cached
from core.guards import TemplateGuard
from core.io import read_json
from core.models import weights_sha256
from core.profile import ModelProfile

BackendLoader = Callable[[str, ModelProfile], HFBackend]
LATER_MODEL = re.compile(r"after stage (\d+)")


def later_stage_number(label: str) -> int:
    """K in the label "after stage K"; a ValueError names the labels that exist."""
    match = LATER_MODEL.fullmatch(label)
    if match is None:
        raise ValueError(f"unknown model label {label!r}: use 'before', 'after' or "
                         f"'after stage K'")
    return int(match.group(1))


@dataclass
class StageContext:
    """One stage of one run. The input model is loaded lazily, once, when a step needs it."""

    run_dir: Path
    number: int
    model_path: str  # loadable path or HF id of the stage's input model
    origin: str  # where the input model comes from (the run's model, stage N-1's merged model)
    profile: ModelProfile
    seed: int
    limit: int
    heldout: int
    constitution: Constitution
    settings: Any = None  # the stage's own typed settings (a core.stage.StageSettings)
    near_duplicate: float = 0.7  # ROUGE-L above which two generated texts count as one
    baseline_limit: int | None = None  # baseline probes per capability in assessments (None: all)
    data_dir: Path | None = None  # shared evaluation sets (decontamination, suites)
    allow_contamination: bool = False
    report_to: tuple[str, ...] = ()  # trackers besides TensorBoard (wandb, trackio)
    log: Callable[[str], None] = print
    # How a model path becomes a backend: load_backend, or a test's scripted backend.
    backend_loader: BackendLoader = load_backend
    _backend: HFBackend | None = field(default=None, repr=False)
    _guard: TemplateGuard | None = field(default=None, repr=False)

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / f"stage_{self.number}"

    def path(self, name: str) -> Path:
        return self.stage_dir / name

    def labelled_model(self, label: str) -> tuple[Path, str]:
        """(record, weights path) of the model a label names: "before" is the stage's input
        (input.json), "after" its merged model (merge.json), "after stage K" a later stage's
        merged model (stage_K/merge.json), which the retention check assesses on this stage's
        held-out tasks."""
        if label == "before":
            return self.path("input.json"), self.model_path
        if label == "after":
            return self.path("merge.json"), str(self.path("merged"))
        later = later_stage_number(label)
        if later <= self.number:
            raise ValueError(f"{label!r} names stage {later}, which is not after stage "
                             f"{self.number}")
        return (self.run_dir / f"stage_{later}" / "merge.json",
                str(self.run_dir / f"stage_{later}" / "merged"))

    def weights_sha(self, label: str) -> str | None:
        """The weights hash of the model `label` names (see `labelled_model`), as its record
        holds it; hashed here only when the stage ran without that record (a 32B model's 65 GB
        take minutes to hash). None for a model without local weights."""
        record, weights = self.labelled_model(label)
        if record.is_file() and "weights_sha256" in (recorded := read_json(record)):
            return recorded["weights_sha256"]
        return weights_sha256(weights)

    def heldout_cache(self, label: str) -> Path:
        """Where the held-out assessment of the model `label` names caches its generations:
        named by the model's weights hash, so a merge that is redone never reuses the outputs
        of the model it replaced."""
        sha = self.weights_sha(label)
        name = label.replace(" ", "_")
        return self.path(f"cache/assess_{name}" + (f"-{sha[:16]}" if sha else "") + ".jsonl")

    def backend(self) -> HFBackend:
        if self._backend is None:
            self.log(f"loading {self.model_path} ({self.profile.dtype}, "
                     f"{'4-bit' if self.profile.load_in_4bit else 'full precision'})")
            self._backend = self.backend_loader(self.model_path, self.profile)
        return self._backend

    def release_backend(self) -> None:
        """Free the input model (training wraps it in place; later steps reload what they need)."""
        self._backend = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def input_tokenizer_and_generation_config(self):
        """The input model's tokenizer and generation config (None when it has none)."""
        from transformers import AutoTokenizer, GenerationConfig

        tokenizer = self._backend.tokenizer if self._backend else \
            AutoTokenizer.from_pretrained(self.model_path)
        try:
            generation_config = GenerationConfig.from_pretrained(self.model_path)
        except OSError:
            generation_config = None
        return tokenizer, generation_config

    def guard(self) -> TemplateGuard:
        """The template guard, built from the input model's own tokenizer."""
        if self._guard is None:
            from transformers import AutoTokenizer

            tokenizer = self._backend.tokenizer if self._backend else \
                AutoTokenizer.from_pretrained(self.model_path)
            self._guard = TemplateGuard(tokenizer)
        return self._guard

    def generate(self, requests: list[GenRequest], settings: SamplingSettings, cache: str,
                 where: str) -> dict[str, dict]:
        """The input model's completions through the stage's cache file cache/<cache> (every
        finished item is kept, so an interrupted step resumes where it stopped)."""
        return generate_cached(self.backend(), requests, settings, self.path(f"cache/{cache}"),
                               self.guard(), self.profile.gen_batch_size, where)

    def sampling(self, temperature: float, max_new_tokens: int,
                 stop: tuple[str, ...]) -> SamplingSettings:
        return SamplingSettings(temperature=temperature, top_p=self.profile.top_p,
                                max_new_tokens=max_new_tokens, stop=stop)
