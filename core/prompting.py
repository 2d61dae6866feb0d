"""The house format and few-shot completion prompts.

Training and assessment prompts are zero-shot in the house format. Generation prompts prepend
3-4 exemplars in the same format (the scaffold); exemplars never reach a training prompt.
"""
from __future__ import annotations

import random

HOUSE_TEMPLATE = "Instruction: {instruction}\n\nResponse:\n"
EXEMPLAR_END = "\n###\n\n"
# A response ends where the model starts the next exemplar block.
RESPONSE_STOPS: tuple[str, ...] = ("\n###", "\nInstruction:")


def house_prompt(instruction: str) -> str:
    """The zero-shot prompt a trained model sees (and the one it is assessed on)."""
    return HOUSE_TEMPLATE.format(instruction=instruction.strip())


def few_shot_prompt(exemplars: list[tuple[str, str]], instruction: str) -> str:
    """Exemplar (instruction, response) blocks, then the target in the house format."""
    blocks = [house_prompt(ex_instruction) + ex_response.strip() + EXEMPLAR_END
              for ex_instruction, ex_response in exemplars]
    return "".join(blocks) + house_prompt(instruction)


def draw(pool: list, rng: random.Random, low: int = 3, high: int = 4) -> list:
    """Between `low` and `high` distinct items of `pool`, in random order (seeded by `rng`)."""
    count = min(len(pool), rng.randint(low, high))
    return rng.sample(pool, count)


def seed_for(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (not Python's salted hash)."""
    import hashlib

    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1
