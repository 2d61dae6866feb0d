"""K few-shot samples per task: the step shape stages 1, 3, 4 and 5 share (responses, verdicts,
revisions). Each request is "<task id>-<k>"; its exemplars are drawn with the seed label
"<kind>-exemplars" and its sampling is seeded with "<kind>", so a sample depends only on the run
seed, the task and k (never on batch composition or on which other tasks exist)."""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable

from core.context import StageContext
from core.generation import GenRequest
from core.io import write_jsonl
from core.prompting import few_shot_prompt, seed_for
from core.records import Task

Shots = Callable[[Task, random.Random], list[tuple[str, str]]]  # (task, rng) -> [(instr, resp)]


def few_shot_requests(seed: int, tasks: list[Task], k: int, kind: str,
                      shots: Shots, first: int = 0) -> list[GenRequest]:
    """K completion requests per task, samples first .. first+K-1: drawn exemplars, then the
    task's text."""
    requests = []
    for task in tasks:
        for j in range(first, first + k):
            rng = random.Random(seed_for(seed, f"{kind}-exemplars", task.id, j))
            requests.append(GenRequest(f"{task.id}-{j}",
                                       few_shot_prompt(shots(task, rng), task.text),
                                       seed_for(seed, kind, task.id, j)))
    return requests


def sample_openings(tasks: list[Task], k: int, opened: int,
                    opening_of: Callable[[Task], str], first: int = 0) -> dict[str, str]:
    """{request id: opening} for the first `opened` of the K samples (numbered from `first`)
    of every task with an opening (`opening_of(task)`, "" for none): how a passing response
    to it begins, a generation scaffold like the exemplars."""
    return {f"{task.id}-{j}": opening for task in tasks if (opening := opening_of(task))
            for j in range(first, first + min(opened, k))}


def with_openings(requests: list[GenRequest], openings: dict[str, str]) -> list[GenRequest]:
    """The requests, each named in `openings` with its opening at the end of its prompt and
    in its `opening`."""
    return [replace(r, prompt=r.prompt + openings[r.id], opening=openings[r.id])
            if r.id in openings else r for r in requests]


def sample_records(tasks: list[Task], results: dict[str, dict], k: int,
                   openings: dict[str, str] | None = None, first: int = 0) -> list[dict]:
    """K samples per task (numbered from `first`) as records in task order: {task_id, sample,
    text (stripped), finish}, plus {opening} for a request whose prompt ended with one
    (`openings`: request id -> opening); its text is the opening followed by what the model
    wrote."""
    openings = openings or {}
    records = []
    for task in tasks:
        for j in range(first, first + k):
            request_id = f"{task.id}-{j}"
            opening = openings.get(request_id, "")
            records.append({"task_id": task.id, "sample": j,
                            "text": (opening + results[request_id]["text"]).strip(),
                            "finish": results[request_id]["finish"],
                            **({"opening": opening} if opening else {})})
    return records


def generate_samples(ctx: StageContext, tasks: list[Task], requests: list[GenRequest],
                     temperature: float, stops: tuple[str, ...], name: str,
                     first: int = 0) -> list[dict]:
    """Generate `requests` (K per task, samples first .. first+K-1; cached in
    cache/<name>.jsonl) and return their records; a request's `opening` begins its sample's
    text (see `sample_records`)."""
    settings = ctx.sampling(temperature, ctx.profile.max_new_tokens, stops)
    results = ctx.generate(requests, settings, f"{name}.jsonl", f"stage {ctx.number} {name}")
    openings = {r.id: r.opening for r in requests if r.opening}
    return sample_records(tasks, results, ctx.profile.responses_per_task, openings, first)


def sample_to_file(ctx: StageContext, tasks: list[Task], requests: list[GenRequest],
                   temperature: float, stops: tuple[str, ...], name: str) -> None:
    """Generate `requests` (see `generate_samples`) and write their records to <name>.jsonl."""
    write_jsonl(ctx.path(f"{name}.jsonl"),
                generate_samples(ctx, tasks, requests, temperature, stops, name))
