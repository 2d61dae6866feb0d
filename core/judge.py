"""A log-probability A/B self-judge, asked in both orders.

The model reads a few-shot judge prompt ending in "Answer:" and we compare the log-probabilities
of the single next tokens " A" and " B". Each comparison is asked twice with the responses
swapped; a verdict counts only when both orders agree (otherwise it is a position-bias tie).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from core.progress import Progress

from core.stats import rate

JUDGE_TEMPLATE = (
    "Instruction: {instruction}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Which response follows the instruction better, A or B?\nAnswer:"
)
JUDGE_END = "\n###\n\n"
OPTIONS = (" A", " B")


@dataclass(frozen=True)
class Verdict:
    """Preference between `x` and `y`: "x", "y" or "tie" (orders disagree)."""

    winner: str
    margin_xy: float  # log p(A) - log p(B) with x shown as A
    margin_yx: float  # log p(B) - log p(A) with y shown as A (positive favours x too)

    @property
    def margin(self) -> float:
        return (self.margin_xy + self.margin_yx) / 2


def consistent_winner(margin_xy: float, margin_yx: float) -> str:
    """"x" or "y" when both orders prefer it, else "tie" (position bias)."""
    return "x" if margin_xy > 0 and margin_yx > 0 else "y" if margin_xy < 0 and margin_yx < 0 \
        else "tie"


def judge_prefix(exemplars: list[dict]) -> str:
    """Few-shot judge blocks: instruction, two responses, the answer."""
    return "".join(
        JUDGE_TEMPLATE.format(instruction=e["instruction"], a=e["response_a"].strip(),
                              b=e["response_b"].strip()) + " " + e["better"] + JUDGE_END
        for e in exemplars
    )


def judge_prompt(prefix: str, instruction: str, a: str, b: str) -> str:
    return prefix + JUDGE_TEMPLATE.format(instruction=instruction, a=a.strip(), b=b.strip())


def option_token_ids(tokenizer, lead: str = "Answer:",
                     options: tuple[str, str] = OPTIONS) -> tuple[int, int]:
    """Token ids of the two options right after `lead` (each must be one token)."""
    base = tokenizer(lead, add_special_tokens=False)["input_ids"]
    ids = []
    for option in options:
        full = tokenizer(lead + option, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(f"the judge needs {option!r} to be one token after {lead!r} "
                             f"for this tokenizer; got {full[len(base):]}")
        ids.append(full[-1])
    return ids[0], ids[1]


def judge_many(backend, guard, items: list[tuple[str, str, str, str]],
               batch_size: int, where: str) -> list[Verdict]:
    """Judge (few-shot prefix, instruction, x, y) items in both orders with batched next-token
    log-probabilities."""
    a_id, b_id = option_token_ids(backend.tokenizer)
    prompts = []
    for prefix, instruction, x, y in items:
        prompts.append(judge_prompt(prefix, instruction, x, y))
        prompts.append(judge_prompt(prefix, instruction, y, x))
    for i, prompt in enumerate(prompts):
        guard.check_prompt(prompt, f"{where} judge prompt {i}")
    margins: list[float] = []
    with Progress(len(prompts), f"{where} judge", unit="prompt") as progress:
        for start in range(0, len(prompts), batch_size):
            logp = backend.option_logprobs(prompts[start : start + batch_size], (a_id, b_id))
            margins += (logp[:, 0] - logp[:, 1]).tolist()
            progress.update(len(logp))
    verdicts = []
    for i in range(len(items)):
        xy, yx = margins[2 * i], -margins[2 * i + 1]
        verdicts.append(Verdict(consistent_winner(xy, yx), xy, yx))
    return verdicts


def winning_sample(judgment: dict) -> int | None:
    """The sample a judgment record (`x`, `y`, `winner`) preferred in both orders; None on a
    tie (the orders disagree: position bias)."""
    return {"x": judgment["x"], "y": judgment["y"]}.get(judgment["winner"])


def judge_audit(judgments: list[dict], passes: Callable[[dict, int], bool | None]) -> dict:
    """How the judge behaved. `order_consistent`: comparisons both orders decided alike.
    `agrees_with_checks`: where the checks tell a comparison's two samples apart
    (`passes(judgment, sample)` True for one and False for the other; None when the checks cannot
    tell), how often its consistent verdict picked the one that passes. `first_shown`: of the
    orders asked (two per comparison), how often the response shown first won: 0.5 is no position
    bias. `averaged_agrees_with_checks`: on the checkable comparisons, how often the
    order-averaged margin (position bias cancelled) favours the one that passes: 0.5 is a judge
    that cannot tell them apart. The last two are diagnostics, not used to choose pairs."""
    consistent = [j for j in judgments if winning_sample(j) is not None]

    def checkable(j: dict) -> bool:
        verdicts = passes(j, j["x"]), passes(j, j["y"])
        return None not in verdicts and verdicts[0] != verdicts[1]

    agree = sum(1 for j in consistent if checkable(j) and passes(j, winning_sample(j)))
    told_apart = [j for j in judgments if checkable(j)]
    averaged = sum(1 for j in told_apart
                   if passes(j, j["x"] if j["margin_xy"] + j["margin_yx"] > 0 else j["y"]))
    first = sum((j["margin_xy"] > 0) + (j["margin_yx"] < 0) for j in judgments)
    return {"comparisons": len(judgments),
            "order_consistent": rate(len(consistent), len(judgments)),
            "agrees_with_checks": rate(agree, sum(map(checkable, consistent))),
            "first_shown": rate(first, 2 * len(judgments)),
            "averaged_agrees_with_checks": rate(averaged, len(told_apart))}


def round_robin_prompts(ranked: int, audits: int = 1) -> int:
    """Judge prompts per task, both orders: a round robin among `ranked` samples plus `audits`
    extra comparisons."""
    return 2 * (ranked * (ranked - 1) // 2 + audits)
