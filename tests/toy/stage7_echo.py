"""A toy seventh stage, written the way a contributor adds a stage: one module, one line in the
curriculum. The model learns to answer a request with a complete sentence ending in a period.

1. responses  two samples per request from the stage's input model (plain completion prompt).
2. pairs      chosen = a sample ending in ".", rejected = one that does not.
Then the shared tail (decontaminate, train, merge, assess, report) from core/stage.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.assess import generate_greedy
from core.contamination import Protected
from core.context import StageContext
from core.generation import GenRequest
from core.io import read_jsonl, write_jsonl
from core.pairs import write_pairs
from core.prompting import RESPONSE_STOPS, house_prompt, seed_for
from core.records import Task
from core.stage import Stage, StageSettings, Step, Work, WorkPlan, setting
from core.stats import rate

REQUESTS = ["Say hello to a friend.", "Describe the sea.", "Name a color.", "Describe a cat.",
            "Say something about rain.", "Describe a tree."]
HELDOUT = ["Describe the moon.", "Say something about snow."]


@dataclass(frozen=True)
class Stage7Settings(StageSettings):
    samples_per_request: int = setting(2, "samples drawn per request")
    temperature: float = setting(1.0, "sampling temperature")


def make_responses(ctx: StageContext, pool: dict) -> None:
    requests = [GenRequest(f"r{i}-{k}", house_prompt(text), seed_for(ctx.seed, "toy", i, k))
                for i, text in enumerate(REQUESTS) for k in range(ctx.settings.samples_per_request)]
    done = ctx.generate(requests, ctx.sampling(ctx.settings.temperature, 16, RESPONSE_STOPS),
                        "responses.jsonl", "stage 7 responses")
    write_jsonl(ctx.path("responses.jsonl"),
                [{"task_id": r.id.split("-")[0], "text": done[r.id]["text"]} for r in requests])


def ends_well(text: str) -> bool:
    return text.strip().endswith(".")


def choose(task: Task, samples: list[dict]) -> tuple[dict | None, str]:
    good = [s for s in samples if ends_well(s["text"])]
    bad = [s for s in samples if not ends_well(s["text"]) and s["text"].strip()]
    if not good or not bad:
        return None, "no good/bad split"
    return {"prompt": house_prompt(task.text), "chosen": good[0]["text"],
            "rejected": bad[0]["text"], "task_id": task.id}, "ok"


def make_pairs(ctx: StageContext, pool: dict) -> None:
    samples = read_jsonl(ctx.path("responses.jsonl"))
    tasks = [Task(f"r{i}", 7, "train", text, "request", "toy") for i, text in enumerate(REQUESTS)]
    write_pairs(ctx, tasks, lambda t: choose(t, [s for s in samples if s["task_id"] == t.id]),
                None, "requests", "raise the samples per request")


def protected_sets(ctx: StageContext) -> Protected:
    return Protected([], [(f"h{i}", text) for i, text in enumerate(HELDOUT)], ctx.data_dir)


def merge_probes(ctx: StageContext) -> list[str]:
    return [house_prompt(text) for text in REQUESTS[:2]]


def assess_heldout(ctx: StageContext, backend, label: str) -> dict:
    texts = generate_greedy(backend, ctx.guard(), ctx.heldout_cache(label),
                            {f"h{i}": house_prompt(t) for i, t in enumerate(HELDOUT)}, 16,
                            ctx.profile.gen_batch_size, f"stage 7 assess {label}")
    items = [{"id": key, "response": text, "passed": ends_well(text)}
             for key, text in texts.items()]
    return {"summary": {"ends_with_period": rate(sum(i["passed"] for i in items), len(items))},
            "items": items}


def report_data(ctx: StageContext) -> dict:
    return {"responses": len(read_jsonl(ctx.path("responses.jsonl")))}


def plan_work(ctx: StageContext) -> WorkPlan:
    return WorkPlan(work=(Work("responses", prompts=len(REQUESTS) * ctx.settings.samples_per_request,
                               new_tokens=ctx.profile.max_new_tokens),),
                    max_pairs=len(REQUESTS), heldout_prompts=len(HELDOUT))


STAGE = Stage(
    number=7,
    name="toy-echo",
    summary="answer with a complete sentence",
    settings=Stage7Settings,
    data_steps=(Step("responses", make_responses), Step("pairs", make_pairs)),
    protected=protected_sets,
    merge_probes=merge_probes,
    assess_heldout=assess_heldout,
    headline="ends_with_period",
    report_data=report_data,
    plan_work=plan_work,
)
