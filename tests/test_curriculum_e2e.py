"""All six stages chained on the tiny model through `run_curriculum`, as `python cli.py run`
runs them: every stage's data comes from the model the previous stage published (recorded path and
weights hash), every kept pair passes the template guards, skipped stages say why and pass their
input on, the run report covers every stage, and the baseline suite is not generated twice for
the same weights.

The tiny model is a 2-layer model pre-trained for seconds: it yields pairs in stages 1 and 2 and
none in stages 3-6 (it cannot write numbered lists on a topic, verdicts with reasons, revisions
that fix a critique, or critiques that win), so those stages end SKIPPED under --skip-empty. Runs
on gemma-3-270m, where every stage keeps pairs, are in docs/results.md."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from app.commands import check_contamination
from core.backend import load_backend
from core.guards import TemplateGuard
from core.io import read_jsonl
from core.models import weights_sha256
from core.errors import NoPairsError, UsageError
from app.pipeline import run_curriculum, run_stage, run_status
from core.prompting import house_prompt
from core.run import RunDirError
from registry.stages import STAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("curriculum") / "run"
    run_curriculum(run_dir, "tiny-qwen2", limit=6, seed=0, log=lambda _: None,
                   baseline_limit=1, skip_empty=True)
    return run_dir


def ended(run_dir: Path) -> dict[int, str]:
    return {row.number: row.state for row in run_status(run_dir)}


def test_every_stage_ends_done_or_skipped(run_dir):
    states = ended(run_dir)
    assert sorted(states) == [s.number for s in STAGES] == [1, 2, 3, 4, 5, 6]
    assert set(states.values()) <= {"DONE", "SKIPPED"}
    # the tiny model does learn something in the first two stages; the rest would be vacuous
    assert states[1] == states[2] == "DONE"


def test_each_stage_learns_from_the_last_trained_model(run_dir, tiny_dir):
    published = (str(tiny_dir.resolve()), weights_sha256(str(tiny_dir)))
    for number, state in sorted(ended(run_dir).items()):
        stage = run_dir / f"stage_{number}"
        recorded = json.loads((stage / "input.json").read_text())
        assert (recorded["path"], recorded["weights_sha256"]) == published, number
        if state == "DONE":
            merge = json.loads((stage / "merge.json").read_text())
            assert merge["weights_sha256"] == weights_sha256(str(stage / "merged"))
            assert merge["weights_sha256"] != published[1]  # training changed the weights
            published = (str(stage / "merged"), merge["weights_sha256"])
        else:
            assert not (stage / "merged").exists() and not (stage / "pairs.jsonl").exists()


def test_kept_pairs_pass_the_guards_and_are_zero_shot(run_dir, tiny_backend):
    guard = TemplateGuard(tiny_backend.tokenizer)
    for number, state in ended(run_dir).items():
        if state != "DONE":
            continue
        pairs = read_jsonl(run_dir / f"stage_{number}" / "pairs.jsonl")
        assert pairs, number
        for pair in pairs:
            guard.check_record(pair, f"stage {number} pairs.jsonl")
            instruction = pair["prompt"].removeprefix("Instruction: ").removesuffix(
                "\n\nResponse:\n")
            assert pair["prompt"] == house_prompt(instruction), "not the zero-shot house format"
            assert "###" not in pair["prompt"] and "Instruction:" not in instruction
            assert pair["chosen"].strip() != pair["rejected"].strip()


def test_skipped_stages_say_why_and_are_recorded(run_dir):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    overridden = {o["stage"] for o in config.get("overrides", []) if o["override"] == "skip_empty"}
    for number, state in ended(run_dir).items():
        if state == "SKIPPED":
            skipped = json.loads((run_dir / f"stage_{number}" / "SKIPPED").read_text())
            assert "no preference pairs" in skipped["reason"]
            assert (run_dir / f"stage_{number}" / "pairs_dropped.jsonl").is_file()
    assert overridden == {n for n, s in ended(run_dir).items() if s == "SKIPPED"}


def test_run_report_covers_every_stage(run_dir):
    report = (run_dir / "report.md").read_text()
    for number, state in ended(run_dir).items():
        assert f"stage {number}" in report
        if state == "DONE":
            assert f"after stage {number}" in report
        else:
            assert f"stage {number}: skipped" in report
    assert (run_dir / "capabilities.png").stat().st_size > 0


def test_baseline_reuses_the_previous_stages_outputs(run_dir):
    after_1 = json.loads((run_dir / "stage_1" / "baseline.json").read_text())["after"]
    before_2 = json.loads((run_dir / "stage_2" / "baseline.json").read_text())["before"]
    assert before_2["items"] == after_1["items"]
    assert len(after_1["items"]) == 7  # --baseline-limit 1: one probe per capability
    models = [json.loads((run_dir / "stage_1" / "input.json").read_text())["path"]] + [
        str(run_dir / f"stage_{n}" / "merged") for n, s in ended(run_dir).items() if s == "DONE"]
    cached = {p.name for p in (run_dir / "cache").glob("baseline-*.jsonl")}
    assert cached == {f"baseline-{weights_sha256(m)[:16]}.jsonl" for m in models}


def test_check_contamination_rechecks_every_trained_stage(run_dir):
    for number, state in ended(run_dir).items():
        if state == "DONE":
            result = check_contamination(run_dir, number, probe=False, log=lambda _: None)
            assert result["ok"] and result["count"] == len(
                read_jsonl(run_dir / f"stage_{number}" / "pairs.jsonl"))
        else:
            with pytest.raises(RunDirError, match="was skipped"):
                check_contamination(run_dir, number, probe=False, log=lambda _: None)


def test_resuming_a_finished_run_changes_nothing(run_dir, tiny_dir):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()
              and p.name not in ("report.md", "capabilities.png", ".lock")}
    run_curriculum(run_dir, None, log=lambda _: None, skip_empty=True)
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before


def test_retention_assesses_each_stage_on_every_later_model(run_dir, tmp_path):
    from app.retention import check_retention
    from core.stats import mcnemar_exact

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    done = [n for n, s in ended(copy).items() if s == "DONE"]
    result = check_retention(copy, log=lambda _: None)
    assert [(r["stage"], r["later_stage"]) for r in result["rows"]] == [
        (a, b) for b in done for a in done if a < b]
    for row in result["rows"]:
        stage, later = copy / f"stage_{row['stage']}", copy / f"stage_{row['later_stage']}"
        sha = json.loads((later / "merge.json").read_text())["weights_sha256"]
        assert row["model_weights_sha256"] == sha
        own = json.loads((stage / "assessment.json").read_text())["after"]["items"]
        cache = stage / "cache" / f"assess_after_stage_{row['later_stage']}-{sha[:16]}.jsonl"
        assert len(read_jsonl(cache)) == len(own) == len(row["later_items"])
        passed = {i["id"]: i["passed"] for i in row["later_items"]}
        scored = [i["id"] for i in own if i["passed"] is not None and passed[i["id"]] is not None]
        expected = mcnemar_exact([next(o["passed"] for o in own if o["id"] == k) for k in scored],
                                 [passed[k] for k in scored])
        assert row["vs_own_after"]["mcnemar"] == expected
        assert row["vs_own_after"]["items"] == len(scored)
        assert row["later"]["k"] == sum(v is True for v in passed.values())
    report = (copy / "report.md").read_text()
    metric = result["rows"][0]["metric"].replace("_", "-")
    assert "## Retention" in report and f"| stage 1 {metric} | after stage 2 |" in report
    stamps = {p: p.stat().st_mtime_ns for p in copy.glob("stage_*/cache/assess_after_stage_*")}
    again = check_retention(copy, log=lambda _: None, after_stages=(done[-1],))  # cached
    assert again["rows"] == result["rows"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_retention_needs_two_finished_stages(run_dir, tmp_path):
    from click.testing import CliRunner

    import cli

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    out = CliRunner().invoke(cli.main, ["check", "retention", "--run-dir", str(copy),
                                        "--after-stage", "1"])
    assert out.exit_code == 2 and "must be a finished stage after the first" in out.output
    for number, state in ended(copy).items():
        if state == "DONE" and number > 1:
            (copy / f"stage_{number}" / "DONE").unlink()
    out = CliRunner().invoke(cli.main, ["check", "retention", "--run-dir", str(copy)])
    assert out.exit_code == 2 and "has 1 finished stage(s)" in out.output
    assert not (copy / "retention.json").exists()


def test_without_skip_empty_an_empty_stage_stops_with_a_clear_error(run_dir, tmp_path):
    skipped = [n for n, s in ended(run_dir).items() if s == "SKIPPED"]
    assert skipped, "the tiny model now keeps pairs in every stage: test --skip-empty elsewhere"
    first = skipped[0]
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    shutil.rmtree(copy / f"stage_{first}")
    with pytest.raises(NoPairsError, match=f"stage {first} produced no preference pairs"):
        run_stage(first, copy, log=lambda _: None)
    assert not (copy / f"stage_{first}" / "SKIPPED").exists()


def test_replay_trains_a_stage_on_earlier_stages_pairs_too(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    stage = copy / "stage_2"
    before = {name: json.loads((stage / name).read_text())
              for name in ("merge.json", "train/settings.json")}
    run_stage(2, copy, log=lambda _: None, overrides=("profile.replay_share=1.0",),
              accept_changed=True, redo_from="decontaminate")
    own, replay = read_jsonl(stage / "pairs.jsonl"), read_jsonl(stage / "replay.jsonl")
    earlier = [(p["prompt"], p["chosen"], p["rejected"])
               for p in read_jsonl(copy / "stage_1" / "pairs.jsonl")]
    candidates = len(read_jsonl(stage / "pairs_candidates.jsonl"))
    assert 0 < len(replay) <= min(candidates, len(earlier))
    assert all(r["replayed_from"] == 1 and (r["prompt"], r["chosen"], r["rejected"]) in earlier
               for r in replay)
    summary = json.loads((stage / "contamination.json").read_text())["replay"]
    assert summary["kept"] == len(replay) and summary["by_stage"] == {"1": len(replay)}
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["data"]["replayed_pairs"] == len(replay)
    assert metrics["data"]["pairs"] == len(own)
    assert "replayed from earlier stages" in (stage / "report.md").read_text()
    # the training data changed, so did the checkpoints' key and the merged weights
    assert json.loads((stage / "train/settings.json").read_text())["pairs_sha256"] != \
        before["train/settings.json"]["pairs_sha256"]
    assert json.loads((stage / "merge.json").read_text())["weights_sha256"] != \
        before["merge.json"]["weights_sha256"]


def test_stage2_dev_questions_are_real_and_never_trained_or_held_out(run_dir):
    from app.commands import stage_context
    from core.run import require_config
    from core.text import rouge_l
    from core.realsets import load_real_questions
    from stages.stage2_implicit_instructions import assess_dev, dev_questions

    ctx = stage_context(run_dir, require_config(run_dir), 2, log=lambda _: None)
    dev = dev_questions(ctx)
    tasks = read_jsonl(run_dir / "stage_2" / "tasks.jsonl")
    real = {q["id"]: q for q in load_real_questions(ctx.data_dir, ctx.settings.heldout_share)}
    assert len(dev) == ctx.settings.dev_questions == len({t.id for t in dev})
    assert all(real[t.id]["split"] == "train" for t in dev)  # never a held-out item
    assert not {t.id for t in dev} & {t["id"] for t in tasks}  # never a training task
    assert all(rouge_l(t.text, task["text"]) <= ctx.near_duplicate for t in dev for task in tasks)
    assert [t.id for t in dev_questions(ctx)] == [t.id for t in dev]  # fixed by the run
    with pytest.raises(UsageError, match="has no dev questions"):
        assess_dev(dataclasses.replace(ctx, data_dir=None), None, run_dir / "unused.jsonl")


def test_tune_measures_what_a_recipe_keeps_of_stage2_on_its_dev_items(run_dir, tmp_path):
    """Stage 2's recipe tuned again from its input model (stage 3 keeps no pairs on the tiny
    model): each point trains with its share of stage 1's pairs replayed, is merged, and stage
    2's dev items are assessed on it, paired with the input model; a point is read back, not
    retrained, and one trained without --retention gets it added from its adapter."""
    from app.commands import retention_metrics, stage_context
    from core.run import require_config
    from core.tune import TuneJob, parse_grid, tune_dpo
    from registry.stages import STAGES

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    config = require_config(copy)
    ctx = stage_context(copy, config, 2, log=lambda _: None)
    pairs = read_jsonl(copy / "stage_2" / "pairs.jsonl")
    replay = read_jsonl(copy / "stage_1" / "pairs.jsonl")
    metrics = retention_metrics(copy, config, 3, log=lambda _: None)
    assert [m.name for m in metrics] == ["stage 2 answer_rate"]
    job = TuneJob(records=pairs, replay=replay, model_path=ctx.model_path, profile=ctx.profile,
                  seed=0, guard=ctx.guard(), work_dir=tmp_path / "tune",
                  load_backend=load_backend, retention=metrics,
                  merge_probes=tuple(STAGES[1].merge_probes(ctx)))
    grid = parse_grid(["profile.replay_share=0,1"])
    plain = dataclasses.replace(job, retention=())
    first = tune_dpo(plain, grid[:1], 0.5, log=lambda _: None)
    assert "retention_dev" not in first["points"][0]
    result = tune_dpo(job, grid, 0.5, log=lambda _: None)
    reference = result["retention_reference"]["stage 2 answer_rate"]
    assert reference["n"] == ctx.settings.dev_questions
    none, some = result["points"]
    assert none["replay_pairs"] == 0
    assert some["replay_pairs"] == min(len(replay), result["train_pairs"])
    assert some["steps"] > none["steps"]
    for point in (none, some):
        kept = point["retention_dev"]["stage 2 answer_rate"]
        assert kept["input_model"] == reference and kept["rate"]["n"] == reference["n"]
        assert kept["vs_input_model"]["items"] == reference["n"]
        assert kept["change_points"] == round(100 * (kept["rate"]["rate"] - reference["rate"]), 1)
        assert not (tmp_path / "tune" / point["label"] / "merged").exists()
        assert len(read_jsonl(tmp_path / "tune" / point["label"] /
                              "dev-stage-2-answer-rate.jsonl")) == reference["n"]
    assert none["steps"] == first["points"][0]["steps"]  # read back, retention added
    assert result["best"] in {none["label"], some["label"]}
    trained = {p: p.stat().st_mtime_ns for p in (tmp_path / "tune").glob("*/adapter/*")}
    assert tune_dpo(job, grid, 0.5, log=lambda _: None)["points"] == result["points"]
    assert {p: p.stat().st_mtime_ns for p in trained} == trained


def test_tune_refuses_retention_without_dev_items_and_a_negative_replay_share(run_dir, tmp_path):
    from click.testing import CliRunner

    import cli

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    out = CliRunner().invoke(cli.main, ["tune", "--run-dir", str(copy), "--stage", "2",
                                        "--retention"])
    assert out.exit_code == 2 and "no finished stage before stage 2" in out.output
    out = CliRunner().invoke(cli.main, ["tune", "--run-dir", str(copy), "--stage", "2",
                                        "--grid", "profile.replay_share=1,-0.5"])
    assert out.exit_code == 2 and "replay_share must be 0 or more, got -0.5" in out.output
    assert not (copy / "stage_2" / "tune").exists()
