"""A scripted backend for tests, in the spirit of lm-evaluation-harness's DummyLM.

It wraps a real backend (the tiny model: its tokenizer and weights still train, merge and
assess) and answers from a script where the script has an answer:

- `complete(prompt)` returns the completion text for a generation prompt, or None to let the
  real model sample it;
- `prefer(prompt)` returns the next-token text to favour after a prompt (" A" or " B" for the
  A/B judge), or None to use the real model's log-probabilities.

A test hands it to a stage through the public `backend_loader` parameter of
`app.pipeline.run_stage` / `run_curriculum`, so the stage runs its real steps (sampling requests,
caches, filters, the judge, pair rules) on scripted answers, with nothing written into caches and
no private field set. Its `source` and `cache_id` are prefixed with "scripted:", so its cache
keys never collide with a real model's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from core.backend import HFBackend, load_backend
from core.profile import ModelProfile
from core.sampler import Completion, SamplingSettings

SCRIPTED_MARGIN = 30.0  # log-probability gap of a scripted preference


def no_answer(prompt: str) -> None:
    return None


@dataclass(frozen=True)
class Script:
    """What the scripted backend answers; None from either function defers to the real model."""

    complete: Callable[[str], str | None] = no_answer
    prefer: Callable[[str], str | None] = no_answer


class ScriptedBackend:
    """A real backend whose generations and next-token preferences a test script may replace."""

    name = "scripted"

    def __init__(self, inner: HFBackend, script: Script):
        self.inner = inner
        self.script = script
        self.source = f"scripted:{inner.source}"
        self.cache_id = f"scripted:{inner.cache_id}"
        self.scripted_completions = 0
        self.scripted_preferences = 0

    @classmethod
    def loader(cls, script: Script) -> Callable[[str, ModelProfile], "ScriptedBackend"]:
        """A `backend_loader` for run_stage: loads the real model at `path`, wraps it."""
        def load(path: str, profile: ModelProfile) -> "ScriptedBackend":
            return cls(load_backend(path, profile), script)
        return load

    @property
    def model(self):
        return self.inner.model

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    @property
    def profile(self) -> ModelProfile:
        return self.inner.profile

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def trainable_model(self, lora: dict, seed: int):
        return self.inner.trainable_model(lora, seed)

    def generate(self, prompts: list[str], settings: SamplingSettings, seeds: list[int],
                 on_finish=None) -> list[Completion]:
        """Scripted completions where the script answers; the real model samples the rest."""
        results: list[Completion | None] = [None] * len(prompts)
        for i, prompt in enumerate(prompts):
            text = self.script.complete(prompt)
            if text is not None:
                results[i] = Completion(text, "stop", len(self.tokenizer.encode(text)))
                self.scripted_completions += 1
                if on_finish:
                    on_finish(i, results[i])
        rest = [i for i, r in enumerate(results) if r is None]
        if rest:
            def finished(j: int, completion: Completion) -> None:
                if on_finish:
                    on_finish(rest[j], completion)
            sampled = self.inner.generate([prompts[i] for i in rest], settings,
                                          [seeds[i] for i in rest], on_finish=finished)
            for i, completion in zip(rest, sampled):
                results[i] = completion
        return results

    def option_logprobs(self, prompts: list[str], token_ids: tuple[int, ...]) -> torch.Tensor:
        return self.next_token_logprobs(prompts)[:, list(token_ids)]

    def next_token_logprobs(self, prompts: list[str]) -> torch.Tensor:
        """The real model's next-token log-probabilities, except after prompts the script
        prefers a next token for: there that token leads every other by SCRIPTED_MARGIN."""
        logp = self.inner.next_token_logprobs(prompts)
        for i, prompt in enumerate(prompts):
            option = self.script.prefer(prompt)
            if option is None:
                continue
            ids = self.tokenizer.encode(option, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"a scripted preference must be one token; {option!r} is {ids}")
            logp[i] = -SCRIPTED_MARGIN
            logp[i, ids[0]] = 0.0
            self.scripted_preferences += 1
        return logp
