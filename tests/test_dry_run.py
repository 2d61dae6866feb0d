"""--dry-run: every option checked as a real run checks it, the steps and their state, and the
most work each step will do; nothing is loaded or written. The estimate is an upper bound of
what a real run did."""
import math
import subprocess
import sys
from pathlib import Path

from app.pipeline import plan_stage_run
from core.io import read_json, read_jsonl
from core.models import PROJECT_ROOT
from core.stage import planned_work
from registry.models import profile_by_name

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def rows(stdout: str) -> dict[str, list[str]]:
    """{step: [state, requests, new tokens, judge prompts, DPO steps]} of the first table."""
    table = stdout.split("how counted\n", 1)[1].split("  still to do")[0]
    return {line.split()[0]: line.split()[1:6] for line in table.splitlines()}


def test_stage_dry_run_lists_every_step_with_its_work_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    out = cli("stage", "run", "1", "--dry-run", "--run-dir", str(run_dir), "--model",
              "tiny-qwen2", "--limit", "8", "--heldout", "4", "--baseline-limit", "1")
    assert out.returncode == 0, out.stderr
    assert not run_dir.exists()
    table = rows(out.stdout)
    assert list(table) == ["instructions", "responses", "scores", "pairs", "decontaminate",
                           "train", "merge", "assess", "report"]
    assert all(state == "pending" for state, *_ in table.values())
    p = profile_by_name("tiny-qwen2")
    assert table["responses"][1] == str(8 * p.responses_per_task)
    assert table["responses"][2] == f"{8 * p.responses_per_task * p.max_new_tokens:,}"
    steps = math.ceil(8 / (p.train_batch_size * p.grad_accum)) * p.epochs
    assert table["train"][4] == str(steps)
    assert f"{steps} DPO steps" in out.stdout.splitlines()[-1]


def test_the_estimate_bounds_what_a_real_run_did(stage1_reference):
    config_before = (stage1_reference / "config.yaml").read_bytes()
    stage, ctx, _ = plan_stage_run(1, stage1_reference, None, None, None, None,
                                   PROJECT_ROOT / "constitution.yaml", log=lambda _: None,
                                   dry_run=True)
    work = {w.step: w for w in planned_work(stage, ctx)}
    stage_dir = stage1_reference / "stage_1"
    assert len(read_jsonl(stage_dir / "responses.jsonl")) == work["responses"].prompts
    assert 2 * len(read_jsonl(stage_dir / "judgments.jsonl")) <= work["scores"].scored
    assert read_json(stage_dir / "train" / "dpo_metrics.json")["steps"] <= work["train"].dpo_steps
    out = cli("stage", "run", "1", "--dry-run", "--run-dir", str(stage1_reference))
    assert out.returncode == 0, out.stderr
    assert "- done already" in out.stdout
    assert all(state == "done" for state, *_ in rows(out.stdout).values())
    assert "still to do: 0 generation requests" in out.stdout
    assert (stage1_reference / "config.yaml").read_bytes() == config_before


def test_run_dry_run_plans_each_stage_on_the_model_the_one_before_will_make(tmp_path):
    run_dir = tmp_path / "run"
    out = cli("run", "--dry-run", "--run-dir", str(run_dir), "--model", "tiny-qwen2",
              "--limit", "4", "--heldout", "100", "--until", "3", "--baseline-limit", "1")
    assert out.returncode == 0, out.stderr
    assert not run_dir.exists()
    for number in (1, 2, 3):
        assert f"stage {number} (" in out.stdout
    assert out.stdout.count("4 training tasks, 100 held-out") == 3  # --heldout reaches every stage
    assert "stage 4 (" not in out.stdout
    assert f"{run_dir.resolve()}/stage_2/merged (stage 2's merged model, once it has run)" \
        in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("whole run, still to do:")


def test_a_dry_run_refuses_bad_options_like_a_real_run(tmp_path):
    out = cli("stage", "run", "1", "--dry-run", "--run-dir", str(tmp_path / "run"),
              "--model", "tiny-qwen2", "--limit", "0")
    assert out.returncode == 2
    assert out.stderr.count("error:") == 1 and "--limit must be a number" in out.stderr
    out = cli("run", "--dry-run", "--run-dir", str(tmp_path / "run"), "--model", "tiny-qwen2",
              "--until", "9")
    assert out.returncode == 2 and "--until must name a stage" in out.stderr


def test_a_gpu_profile_is_planned_without_a_gpu_and_still_refused_for_a_real_run(tmp_path):
    """A dry run loads nothing, so it sizes a 32B run on a laptop; a real run still needs CUDA."""
    from click.testing import CliRunner

    from cli import main

    run_dir = tmp_path / "run"
    planned = CliRunner().invoke(main, ["stage", "run", "1", "--dry-run", "--model",
                                        "qwen2.5-32b", "--limit", "1000", "--run-dir",
                                        str(run_dir)])
    assert planned.exit_code == 0, planned.output
    assert "profile qwen2.5-32b" in planned.output
    assert "4,000" in planned.output  # responses: 1,000 tasks x K 4
    assert not run_dir.exists()
    real = CliRunner().invoke(main, ["stage", "run", "1", "--model", "qwen2.5-32b", "--limit",
                                     "4", "--run-dir", str(run_dir)])
    assert real.exit_code == 2 and "needs a CUDA GPU" in real.output


def test_a_preset_fills_only_the_options_the_command_line_leaves_out(tmp_path):
    from registry.presets import preset_by_name

    demo = preset_by_name("demo")
    out = cli("run", "--dry-run", "--preset", "demo", "--run-dir", str(tmp_path / "run"),
              "--model", "tiny-qwen2", "--limit", "4", "--until", "1")
    assert out.returncode == 0, out.stderr
    assert f"4 training tasks, {demo.heldout} held-out" in out.stdout  # --limit won
    assert "profile tiny-qwen2" in out.stdout  # --model won
    out = cli("run", "--dry-run", "--preset", "demo", "--run-dir", str(tmp_path / "run"),
              "--until", "1")
    assert out.returncode == 0, out.stderr
    assert f"{demo.limit} training tasks, {demo.heldout} held-out" in out.stdout
    assert f"profile {demo.model}" in out.stdout


def test_a_preset_s_settings_come_before_the_command_line_s():
    from cli import with_preset
    from registry.presets import preset_by_name

    demo = preset_by_name("demo")
    model, limit, heldout, baseline, overrides = with_preset(
        "demo", None, None, 7, None, ("profile.learning_rate=1e-5",))
    assert (model, limit, heldout, baseline) == (demo.model, demo.limit, 7, demo.baseline_limit)
    assert overrides == (*demo.overrides, "profile.learning_rate=1e-5")  # the later item wins
    out = cli("run", "--dry-run", "--preset", "nonesuch")
    assert out.returncode == 2 and "nonesuch" in out.stderr
