"""List continuation (core/listgen.py) on the tiny model: rounds, oversampling, audit, resume."""
from core.constitution import load_constitution
from core.context import StageContext
from core.listgen import ListGrowth, grow_list
from core.models import PROJECT_ROOT
from registry.models import profile_by_name

SEEDS = ["Describe a river.", "Name three birds.", "Explain what rain is.", "List two fruits.",
         "Write a line about snow."]


def context(tmp_path, tiny_dir) -> StageContext:
    return StageContext(run_dir=tmp_path, number=1, model_path=str(tiny_dir), origin="test",
                        profile=profile_by_name("tiny-qwen2"), seed=0, limit=2, heldout=1,
                        constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                        log=lambda _: None)


def growth(problem) -> ListGrowth:
    return ListGrowth(prompt=lambda items: "\n".join(f"Task {i}: {t}" for i, t in
                                                     enumerate(items + [""], 1)).rstrip(),
                      clean=lambda text: " ".join(text.split()), problem=problem,
                      temperature=0.9, rounds=3, oversample=1.5, cache="list.jsonl",
                      seed_names=("shown", "sampled"), where="test list")


def test_accepting_everything_takes_one_oversampled_round(tmp_path, tiny_dir):
    accepted, audit = grow_list(context(tmp_path, tiny_dir), growth(lambda _: None), SEEDS, 3)
    assert len(audit) == 5 and [a["id"] for a in audit] == [f"r0-{i}" for i in range(5)]
    assert accepted == [a["text"] for a in audit][:3]


def test_rejections_are_audited_round_after_round(tmp_path, tiny_dir):
    accepted, audit = grow_list(context(tmp_path, tiny_dir), growth(lambda _: "too short"),
                                SEEDS, 2)
    assert accepted == [] and len(audit) == 3 * 3
    assert {a["dropped"] for a in audit} == {"too short"}
    assert {a["id"][:2] for a in audit} == {"r0", "r1", "r2"}


def test_a_second_call_reads_the_cache_and_agrees(tmp_path, tiny_dir):
    ctx = context(tmp_path, tiny_dir)
    first = grow_list(ctx, growth(lambda _: None), SEEDS, 3)
    cached = ctx.path("cache/list.jsonl").read_text()
    assert grow_list(ctx, growth(lambda _: None), SEEDS, 3) == first
    assert ctx.path("cache/list.jsonl").read_text() == cached
