"""Template-contamination guards.

Base-model prompts are raw text in the house format. The tokenizer's chat template is never
applied to them; these guards make that true by construction: every prompt that reaches
generation and every record that reaches training passes through `TemplateGuard`, which raises
`TemplateContaminationError` on chat markup, special chat tokens, or the template's default
system prompt. `apply_chat_template` is called here only to *learn* what the template injects.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import RunFailure

# Markup of the common chat formats. A base model's prompt or training record never needs these.
CHAT_MARKERS: tuple[str, ...] = (
    "<|im_start|>", "<|im_end|>",                      # ChatML (Qwen)
    "<start_of_turn>", "<end_of_turn>",                # Gemma
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # Llama 3
    "[INST]", "[/INST]", "<<SYS>>",                    # Llama 2 / Mistral
    "<|system|>", "<|user|>", "<|assistant|>",         # Zephyr / Phi
    "<|endoftext|>",                                   # an EOS spelled out in text
    "You are Qwen, created by Alibaba Cloud",          # Qwen's default system prompt
)

_SENTINEL = "\u2063SENTINEL\u2063"


class TemplateContaminationError(RunFailure):
    """Chat-template markup reached a base-model prompt or a training record."""


@dataclass(frozen=True)
class Finding:
    marker: str
    offset: int


def template_injected_text(tokenizer) -> list[str]:
    """Plain-text lines the tokenizer's chat template adds around a user message (e.g. a default
    system prompt). Empty when the tokenizer has no chat template."""
    if not tokenizer.chat_template:
        return []
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    pieces = []
    for special in tokenizer.all_special_tokens:
        rendered = rendered.replace(special, "\n")
    for line in re.split(r"[\n]+", rendered.replace(_SENTINEL, "\n")):
        line = line.strip()
        if len(line.split()) >= 4:  # a sentence (a system prompt), not a role name
            pieces.append(line)
    return pieces


def chat_special_tokens(tokenizer) -> list[str]:
    """Special tokens of the tokenizer that are chat or turn markup (not BOS/EOS/PAD/UNK)."""
    plain = {tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token}
    turn_words = ("im_start", "im_end", "turn", "header", "eot", "system", "user", "assistant")
    found = []
    for token in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        if token in plain or not token:
            continue
        if any(word in token for word in turn_words) and token not in found:
            found.append(token)
    return found


class TemplateGuard:
    """Finds chat markup in text; raises on prompts and training records."""

    def __init__(self, tokenizer=None, extra_markers: tuple[str, ...] = ()):
        markers = list(CHAT_MARKERS) + list(extra_markers)
        if tokenizer is not None:
            markers += chat_special_tokens(tokenizer) + template_injected_text(tokenizer)
        self.markers = tuple(dict.fromkeys(m for m in markers if m))

    def find(self, text: str) -> list[Finding]:
        """Every marker in `text` with its offset (empty list when clean)."""
        findings = []
        for marker in self.markers:
            offset = text.find(marker)
            if offset >= 0:
                findings.append(Finding(marker, offset))
        return findings

    def is_clean(self, text: str) -> bool:
        return not self.find(text)

    def check_prompt(self, text: str, where: str) -> None:
        """Raise if a base-model prompt carries chat markup."""
        findings = self.find(text)
        if findings:
            raise TemplateContaminationError(_message("prompt", where, findings, text))

    def check_record(self, record: dict, where: str) -> None:
        """Raise if a training record (prompt / chosen / rejected) carries chat markup."""
        for field in ("prompt", "chosen", "rejected"):
            findings = self.find(str(record.get(field, "")))
            if findings:
                raise TemplateContaminationError(
                    _message(f"training record field '{field}'", where, findings, record[field])
                )

    def check_records(self, records: list[dict], name: str) -> None:
        """`check_record` on each record, named as line N of `name` (1-based)."""
        for i, record in enumerate(records):
            self.check_record(record, f"{name} line {i + 1}")


def _message(what: str, where: str, findings: list[Finding], text: str) -> str:
    first = findings[0]
    start = max(0, first.offset - 30)
    context = text[start : first.offset + len(first.marker) + 30].replace("\n", "\\n")
    markers = ", ".join(repr(f.marker) for f in findings)
    return (
        f"chat-template contamination in {what} at {where}: found {markers} "
        f"(near: ...{context}...). Base-model prompts and training data must be raw house-format "
        f"text; never build them with apply_chat_template or role/content message lists. "
        f"Remove the markup from the source of this text."
    )
