"""Reports, the benchmark command and result comparison, on synthetic or tiny inputs."""
import pytest

from app.commands import default_out, suite_cache_path
from core.report import capability_rows
from core.stats import rate
from core.suites.runner import SuiteMismatchError, compare_results


def stage_metrics(before: int, after: int) -> dict:
    summary = lambda k: {"summary": {"score": rate(k, 10)}}  # noqa: E731
    cap = {"metric": "m", "before": rate(1, 10), "after": rate(after, 10),
           "fewshot_reference": rate(5, 10), "paired": None}
    return {"assessment": {"headline": "score", "before": summary(before), "after": summary(after)},
            "baseline": {"judging": cap}}


def test_heldout_rows_fill_only_the_columns_they_measure():
    rows = capability_rows({1: stage_metrics(1, 2), 2: stage_metrics(3, 4), 3: stage_metrics(5, 6)})
    # columns: base, after 1, after 2, after 3, few-shot reference
    assert rows["stage 1 held-out score"] == [rate(1, 10), rate(2, 10), None, None, None]
    third = rows["stage 3 held-out score"]
    assert third[0] is third[1] is None  # not measured on the base or after stage 1
    assert third[2] == rate(5, 10) and third[3] == rate(6, 10)
    assert rows["judging"][-1] == rate(5, 10)


def retention_row(stage: int, later: int, k: int, shas: tuple[str, str]) -> dict:
    test = {"mcnemar": {"gained": 0, "lost": 2, "p_value": 0.5}, "items": 10}
    return {"stage": stage, "name": "s", "metric": "score", "model": f"after stage {later}",
            "later_stage": later, "stage_weights_sha256": shas[0],
            "model_weights_sha256": shas[1], "before": rate(1, 10), "own_after": rate(2, 10),
            "later": rate(k, 10), "change_points": 10.0 * (k - 2), "vs_own_after": test,
            "vs_before": test, "falls_more_than_drop": k < 2}


def test_retention_fills_the_later_columns_and_a_redone_stage_makes_its_rows_stale(tmp_path):
    from core.io import write_json
    from core.report import write_run_report

    for n, (before, after) in {1: (1, 2), 2: (3, 4), 3: (5, 6)}.items():
        write_json(tmp_path / f"stage_{n}" / "metrics.json",
                   {"name": f"s{n}", **stage_metrics(before, after)})
        write_json(tmp_path / f"stage_{n}" / "merge.json", {"weights_sha256": f"sha{n}"})
    write_json(tmp_path / "retention.json", {"drop_points": 5.0, "rows": [
        retention_row(1, 2, 0, ("sha1", "sha2")), retention_row(1, 3, 3, ("sha1", "sha3")),
        retention_row(2, 3, 9, ("sha2", "old sha3"))]})  # stage 3 was redone since
    write_run_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| stage 1 held-out"))
    assert [cell.strip()[-6:] for cell in row.split("|")[2:-1]] == [
        "(1/10)", "(2/10)", "(0/10)", "(3/10)", "-"]
    second = next(line for line in report.splitlines() if line.startswith("| stage 2 held-out"))
    assert "(9/10)" not in second  # the stale row is not shown
    assert "1 earlier retention result(s) left out" in report
    assert "| stage 1 score | after stage 2 |" in report and "**falls more than 5 points**" in report
    assert (tmp_path / "capabilities.png").stat().st_size > 0


def test_the_run_report_sums_the_finished_steps_wall_time_per_stage(tmp_path):
    import time

    from core.io import write_json
    from core.report import stage_compute, write_run_report
    from core.run import StageSteps

    def step(stage_dir, name: str, seconds: float):
        def action():
            time.sleep(seconds)
            (stage_dir / f"{name}.out").write_text(name)
        return name, action

    plan = {1: {"instructions": 0.3, "responses": 0.2, "train": 0.4, "assess": 0.1},
            2: {"questions": 0.1, "train": 0.2}}
    for n, steps in plan.items():
        stage_dir = tmp_path / f"stage_{n}"
        stage_dir.mkdir()
        write_json(stage_dir / "metrics.json", {"name": f"s{n}", **stage_metrics(1, 2)})
        StageSteps(stage_dir, list(steps)).run(
            [step(stage_dir, name, seconds) for name, seconds in steps.items()], lambda _: None)
    first = stage_compute(tmp_path / "stage_1")
    assert list(first) == ["data steps", "train", "merge", "assess", "decontaminate and report"]
    assert 0.5 <= first["data steps"] < 0.9 and 0.4 <= first["train"] < 0.8  # own steps summed
    assert first["merge"] == 0.0 and 0.1 <= first["assess"] < 0.5
    assert stage_compute(tmp_path / "stage_3") == dict.fromkeys(first, 0.0)  # never ran
    write_run_report(tmp_path)
    section = (tmp_path / "report.md").read_text().split("## Compute", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["stage", "1", "2", "all"]
    assert rows[-1].split("|")[-2].strip() == "0.0"  # minutes


def test_default_assessment_outputs_do_not_collide(tmp_path):
    a = default_out("path:merged", str(tmp_path / "run_a" / "merged"), "baseline")
    b = default_out("path:merged", str(tmp_path / "run_b" / "merged"), "baseline")
    assert a != b and a.name.endswith("-baseline.json")


def test_a_model_rewritten_at_the_same_path_gets_a_new_suite_cache(tmp_path):
    import os

    model = tmp_path / "run" / "stage_1" / "merged"
    model.mkdir(parents=True)
    weights = model / "model.safetensors"
    weights.write_bytes(b"old weights")
    out = tmp_path / "assess" / "merged-ifeval.json"
    first = suite_cache_path(out, "ifeval", str(model))
    assert first == suite_cache_path(out, "ifeval", str(model))  # same weights, same cache
    weights.write_bytes(b"new weights")  # a redone merge writes the file again
    os.utime(weights, ns=(1, weights.stat().st_mtime_ns + 1))
    second = suite_cache_path(out, "ifeval", str(model))
    assert second != first and second.parent == first.parent == out.parent / "cache"
    assert suite_cache_path(out, "ifeval", "Qwen/Qwen2.5-32B").name == "ifeval-no-local-weights.jsonl"


def test_results_of_different_suites_are_not_paired():
    with pytest.raises(SuiteMismatchError, match="cannot pair"):
        compare_results({"suite": "baseline", "items": []}, {"suite": "ifeval", "items": []})


def test_generation_benchmark_prints_ratios(tiny_backend):
    from core.bench import bench_generation

    rows = bench_generation(tiny_backend, count=20, max_new_tokens=4, batch_sizes=(1, 20))
    # the one-forward prompt pass differs from ours only above PREFILL_ROWS (16) prompts
    assert [(r["engine"], r["batch"]) for r in rows] == [
        ("ours", 1), ("ours", 20), ("ours, prompts in one forward", 20),
        ("transformers generate", 1), ("transformers generate", 20)]
    assert all(r["tokens"] == 80 for r in rows)  # every engine makes exactly 20 x 4 tokens
    assert rows[0]["speedup_vs_ours_batch_1"] == 1.0
    assert all(0 < r["share_of_compute_limit"] < 1 for r in rows)  # below the matmul rate
    # MFU also counts the prompt tokens' FLOPs, so it is above the generated tokens' share
    assert all(r["share_of_compute_limit"] < r["mfu"] < 1 for r in rows)
    assert all(r["peak_rss_gb"] > 0 for r in rows)


def test_flops_per_token_counts_every_weight_a_token_passes_through(tiny_backend):
    from core.bench import flops_per_prompt_token, flops_per_token

    model = tiny_backend.model
    config = model.config
    embedding = config.vocab_size * config.hidden_size
    total = sum(p.numel() for p in model.parameters())
    assert config.tie_word_embeddings  # the head is the embedding matrix, used as a projection
    assert flops_per_token(model) == 2 * total
    assert flops_per_token(model) > 2 * (total - embedding)
    assert flops_per_prompt_token(model) == 2 * (total - embedding)  # no LM head on a prompt


def test_the_report_of_a_stage_that_started_from_a_hub_id(stage1_reference):
    from core.io import read_json
    from core.report import stage_report

    metrics = read_json(stage1_reference / "stage_1" / "metrics.json")
    metrics["input_model"] = {**metrics["input_model"], "path": "Qwen/Qwen2.5-32B",
                              "weights_sha256": None}  # a Hub id has no local weights to hash
    report = stage_report(1, "explicit-instructions", metrics, [])
    assert "Input model: `Qwen/Qwen2.5-32B` (a Hub id: no local weights hash)" in report


def test_training_benchmark_runs_each_variant_in_its_own_process(stage1_reference):
    from core.bench import TRAIN_VARIANTS, bench_train
    from core.io import read_jsonl
    from core.models import ensure_tiny_qwen2
    from registry.models import profile_by_name

    from conftest import ROOT

    pairs = read_jsonl(stage1_reference / "stage_1" / "pairs.jsonl")
    model = ensure_tiny_qwen2(ROOT / "artifacts" / "models")
    rows = bench_train(str(model), profile_by_name("tiny-qwen2"), pairs, steps=1)
    assert [r["variant"] for r in rows] == list(TRAIN_VARIANTS)
    assert all(r["steps"] == 1 and r["pairs_per_s"] > 0 and r["peak_rss_gb"] > 0 for r in rows)
    assert rows[-1]["batch"] == 8 and rows[-1]["max_length"] == 1024  # TRL's own defaults
    assert rows[0]["batch"] == 1 and rows[0]["vs_project"] == 1.0  # the tiny profile's 1 x 1
    assert rows[2]["batch"] == rows[0]["batch"]  # one micro-batch: the same pairs per step


def test_held_out_pairing_tests_the_headline_and_non_degenerate_outcomes():
    from core.lifecycle import paired_outcomes
    from core.report import assessment_section

    def item(i, passed, degenerate):
        return {"id": f"t{i}", "passed": passed, "degenerate": "loops" if degenerate else None}

    before = [item(0, False, True), item(1, False, True), item(2, None, True), item(3, True, False)]
    after = [item(0, True, False), item(1, False, False), item(2, None, False), item(3, True, True)]
    paired = paired_outcomes(before, after)
    assert paired["items"] == 3 and paired["mcnemar"]["gained"] == 1  # t2 has no constraints
    clean = paired["non_degenerate"]
    assert (clean["items"], clean["gained"], clean["lost"]) == (4, 3, 1)
    summary = {"summary": {"prompt_level": rate(1, 3)}}
    lines = assessment_section({"headline": "prompt_level", "before": summary, "after": summary,
                                "paired": paired})
    assert "On non-degenerate outcomes (4 items): 3 gained, 1 lost, p = 0.625." in lines
    # items with per-check outcomes (stage 3) get a test per check
    checked = [[{"id": f"t{i}", "passed": ok, "checks": {"count_ok": ok, "on_topic": not ok}}
                for i, ok in enumerate(side)] for side in ([False] * 6, [True] * 5 + [False])]
    paired = paired_outcomes(*checked)
    assert {k: (v["gained"], v["lost"], v["items"]) for k, v in paired["checks"].items()} == {
        "count_ok": (5, 0, 6), "on_topic": (0, 5, 6)}
    lines = assessment_section({"headline": "task_success", "before": summary, "after": summary,
                                "paired": paired})
    assert "- count-ok: 5 gained, 0 lost, p = 0.0625" in lines
    # items that do not record degeneracy get the headline test only
    assert "non_degenerate" not in paired_outcomes([{"id": "a", "passed": True}],
                                                   [{"id": "a", "passed": False}])


def test_a_later_model_label_names_its_stage_and_a_typo_is_refused():
    from core.context import later_stage_number

    assert later_stage_number("after stage 6") == 6
    with pytest.raises(ValueError, match="use 'before', 'after' or 'after stage K'"):
        later_stage_number("after stage six")
