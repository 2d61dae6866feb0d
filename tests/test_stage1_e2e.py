"""Stage 1 end to end on the tiny model, through the CLI: interface files, guards, and resume
after SIGKILL in the middle of generation and of training."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from core.constraints import response_opening
from core.records import read_tasks
from core.sampling import sample_openings
from registry.models import profile_by_name
from conftest import stage1_command

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
command = stage1_command


def run_to_end(run_dir: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(command(run_dir), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def kill_when(run_dir: Path, ready, number: int = 1) -> None:
    """Start stage `number` and SIGKILL it as soon as `ready(stage_dir)` holds."""
    args = command(run_dir) if number == 1 else stage_command(run_dir, number)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    stage = run_dir / f"stage_{number}"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ready(stage):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.005)
    raise AssertionError(f"the run ended (rc={proc.poll()}) before the kill point was reached")


def stage_command(run_dir: Path, number: int) -> list[str]:
    """A later stage of the run, with the run's own settings."""
    return [sys.executable, str(ROOT / "cli.py"), "stage", "run", str(number), "--run-dir",
            str(run_dir)]


def merged_weights(run_dir: Path, number: int = 1) -> dict:
    weights = {}
    for shard in sorted((run_dir / f"stage_{number}" / "merged").glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    return weights


@pytest.fixture(scope="module")
def reference(stage1_reference) -> Path:
    return stage1_reference


def test_interface_files(reference):
    stage = reference / "stage_1"
    for name in ("pairs.jsonl", "metrics.json", "report.md", "DONE", "adapter/adapter_config.json",
                 "merged/config.json", "dpo_curves.png", "train/dpo_log.jsonl", "contamination.tsv",
                 "contamination.json", "baseline.json"):
        assert (stage / name).exists(), name
    assert (reference / "report.md").is_file() and (reference / "capabilities.png").is_file()
    assert "Capability table" in (reference / "report.md").read_text()
    pairs = [json.loads(line) for line in (stage / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)
    assert len({p["task_id"] for p in pairs}) == len(pairs)
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["dpo"]["steps"] > 0 and metrics["dpo"]["per_step"][0]["loss"] > 0
    for side in ("before", "after"):
        summary = metrics["assessment"][side]["summary"]
        assert set(summary) == {"prompt_level", "constraint_level", "non_degenerate"}
        assert summary["non_degenerate"]["n"] == metrics["data"]["tasks_heldout"] == 8
    assert metrics["data"]["tasks_train"] == 8
    assert set(metrics["baseline"]) >= {"explicit_constraints", "bare_questions", "judging",
                                        "revision", "harmful_requests", "benign_lookalikes"}
    assert metrics["contamination"]["records"] >= len(pairs)
    assert metrics["contamination"]["template_probe"]["has_chat_template"]
    config = yaml.safe_load((reference / "config.yaml").read_text())
    assert config["run"] == {"model": "tiny-qwen2", "seed": 0, "limit": 8, "heldout": 8,
                             "baseline_limit": None}
    assert config["versions"]["trl"] and config["versions"]["transformers"]
    # the commit of each process that worked on the stage (one here)
    assert json.loads((stage / "input.json").read_text())["git_commits"] == [config["git_commit"]]
    assert config["constitution"]["version"] == 1 and "git_commit" in config
    assert "Stage 1" in (stage / "report.md").read_text()


def test_funnel_accounts_for_every_task_and_sample(reference):
    stage = reference / "stage_1"
    metrics = json.loads((stage / "metrics.json").read_text())
    funnel, samples = metrics["funnel"], metrics["data"]["samples"]
    candidates = (stage / "pairs_candidates.jsonl").read_text().splitlines()
    dropped = (stage / "pairs_dropped.jsonl").read_text().splitlines()
    assert funnel["tasks"] == metrics["data"]["tasks_train"] == len(candidates) + len(dropped)
    assert funnel["pairs_chosen"] == len(candidates) == sum(funnel["pairs_by_rule"].values())
    assert set(funnel["pairs_by_rule"]) <= {"checks", "judge", "hindsight"}
    assert sum(funnel["no_pair_reasons"].values()) == len(dropped)
    stated = metrics["data"]["tasks with a pair by the stated constraints alone"]
    assert 0 <= stated <= funnel["tasks"]
    rules = funnel["pairs_by_rule"]
    assert rules.get("checks", 0) + rules.get("judge", 0) <= stated
    assert funnel["pairs_kept"] == funnel["pairs_chosen"] - funnel["removed_by_decontamination"]
    assert samples["total"] == metrics["data"]["responses"]
    assert samples["total"] == samples["usable"] + sum(
        n for key, n in samples.items() if key.startswith("unusable ("))
    report = (stage / "report.md").read_text()
    assert f"funnel: {funnel['tasks']} tasks -> {funnel['pairs_chosen']} pairs chosen" in report
    assert "usable and passing" in report
    # the samples that began from their constraints' opening: which ones, and their texts
    config = yaml.safe_load((reference / "config.yaml").read_text())
    responses = [json.loads(line) for line in (stage / "responses.jsonl").read_text().splitlines()]
    opened = {f"{r['task_id']}-{r['sample']}": r for r in responses if "opening" in r}
    expected = sample_openings(read_tasks(stage / "tasks.jsonl", "train"),
                               config["settings"]["profile"]["responses_per_task"],
                               config["settings"]["stage1"]["opened_samples"],
                               lambda task: response_opening(task.extra["constraints"]))
    assert expected and {key: r["opening"] for key, r in opened.items()} == expected
    assert all(r["text"].startswith(r["opening"].strip()) for r in opened.values())
    assert samples["opened (began from the constraints' opening)"] == len(opened)


def test_merged_model_loads_and_differs_from_base(reference, tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(reference / "stage_1" / "merged"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    assert model.config.model_type == "qwen2"
    diffs = [float((p - b).abs().max()) for p, b in zip(model.parameters(), base.parameters())]
    assert max(diffs) > 0


def test_pairs_pass_guards_and_hold_no_exemplars(reference, tiny_backend):
    from core.guards import TemplateGuard
    from stages.stage1_explicit_instructions import exemplar_texts, load_pool

    guard = TemplateGuard(tiny_backend.tokenizer)
    exemplars = exemplar_texts(load_pool())
    for line in (reference / "stage_1" / "pairs.jsonl").read_text().splitlines():
        pair = json.loads(line)
        guard.check_record(pair, "pairs.jsonl")
        assert pair["prompt"].count("Instruction:") == 1
        assert not any(ex.strip() and ex.strip() in pair["prompt"] for ex in exemplars[60:])


def test_heldout_never_trains(reference):
    stage = reference / "stage_1"
    held = {t.text for t in read_tasks(stage / "tasks.jsonl", "heldout")}
    assert held
    for line in (stage / "pairs.jsonl").read_text().splitlines():
        assert not any(h in json.loads(line)["prompt"] for h in held)


def test_rerun_of_a_finished_stage_changes_nothing(reference):
    before = (reference / "stage_1" / "pairs.jsonl").read_bytes()
    out = run_to_end(reference)
    assert "step train: done (skipped)" in out.stdout
    assert (reference / "stage_1" / "pairs.jsonl").read_bytes() == before


def status(run_dir: Path) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "status", "--run-dir",
                          str(run_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_status_shows_steps(reference):
    out = status(reference)
    assert "stage 1 (explicit-instructions): DONE" in out
    assert len(re.findall(r"^  \w+ +done +in \d+ s$", out, re.MULTILINE)) == 9


def test_resume_with_another_model_is_refused(reference):
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "stage", "run", "1", "--run-dir",
                          str(reference), "--model", "gemma-3-270m"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "model: the run has 'tiny-qwen2', this command asks for 'gemma-3-270m'" in out.stderr


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    stage, ref = run_dir / "stage_1", reference / "stage_1"
    assert (stage / "pairs.jsonl").read_bytes() == (ref / "pairs.jsonl").read_bytes()
    ours, theirs = merged_weights(run_dir), merged_weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_killed_at_every_lifecycle_point_then_resumed(tmp_path, reference):
    """One run SIGKILLed nine times, resumed after each kill: inside list growth, inside
    response generation, at the start of scores, pairs and decontaminate, inside training
    (after a checkpoint), at the start of merge, inside assess, at the start of report. Nothing is
    generated twice, status shows how far each partial step got, and the result equals the
    uninterrupted run's."""
    run_dir = tmp_path / "run"
    stage = run_dir / "stage_1"
    responses = stage / "cache" / "responses.jsonl"
    checkpoints = stage / "train" / "checkpoints"
    expected = 8 * profile_by_name("tiny-qwen2").responses_per_task
    kill_when(run_dir, lambda stage: _lines(stage / "cache" / "instructions.jsonl") >= 2)
    kill_when(run_dir, lambda stage: _lines(responses) >= 3)
    partial = _lines(responses)
    assert 3 <= partial < expected and not (stage / "steps" / "responses.done").exists()
    assert f"responses     partial  {partial} generated items cached" in status(run_dir)
    for step in ("responses", "scores", "pairs"):  # at the start of the next step
        kill_when(run_dir, lambda stage, step=step: (stage / "steps" / f"{step}.done").exists())
    kill_when(run_dir, lambda stage: any(checkpoints.glob("checkpoint-*/trainer_state.json")))
    assert not (stage / "steps" / "train.done").exists()
    assert re.search(r"train +partial +checkpoint at step \d+ of \d+", status(run_dir))
    for ready in (lambda stage: (stage / "steps" / "train.done").exists(),
                  lambda stage: sum(_lines(p) for p in (stage / "cache").glob("assess_before*")) >= 2,
                  lambda stage: (stage / "steps" / "assess.done").exists()):
        kill_when(run_dir, ready)
        assert not (stage / "DONE").exists()
    run_to_end(run_dir)
    keys = [json.loads(line)["key"] for line in responses.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == expected  # nothing generated twice
    ref = reference / "stage_1"
    for name in ("tasks.jsonl", "responses.jsonl", "scores.jsonl"):
        assert (stage / name).read_bytes() == (ref / name).read_bytes(), name
    steps = [[json.loads(line)["step"] for line in (d / "train" / "dpo_log.jsonl").read_text()
              .splitlines()] for d in (stage, ref)]
    assert steps[0] == steps[1]
    ours, theirs = (json.loads((d / "assessment.json").read_text()) for d in (stage, ref))
    for side in ("before", "after"):
        assert ours[side]["items"] == theirs[side]["items"]
    assert_same_as_reference(run_dir, reference)


def test_a_later_stage_killed_then_resumed_equals_an_uninterrupted_one(tmp_path, reference):
    """Stage 2, chained from the trained stage 1, killed inside its response generation and
    inside training, then resumed: its pairs and merged weights equal an uninterrupted stage 2."""
    import shutil

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for run_dir in (whole, killed):
        shutil.copytree(reference, run_dir)
    out = subprocess.run(stage_command(whole, 2), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    stage = killed / "stage_2"
    kill_when(killed, lambda stage: _lines(stage / "cache" / "responses.jsonl") >= 3, number=2)
    kill_when(killed, lambda stage: any(stage.glob("train/checkpoints/checkpoint-*/"
                                                   "trainer_state.json")), number=2)
    assert not (stage / "DONE").exists()
    out = subprocess.run(stage_command(killed, 2), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    recorded = json.loads((stage / "input.json").read_text())
    assert recorded["path"] == str(killed / "stage_1" / "merged")
    assert len(recorded["git_commits"]) == 1  # three processes, one commit: recorded once
    for name in ("tasks.jsonl", "responses.jsonl", "pairs.jsonl"):
        assert (stage / name).read_bytes() == (whole / "stage_2" / name).read_bytes(), name
    ours, theirs = merged_weights(killed, 2), merged_weights(whole, 2)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_damaged_outputs_of_a_done_stage_are_redone_not_trusted(tmp_path, reference):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    stage = run_dir / "stage_1"
    responses = stage / "responses.jsonl"
    responses.write_text("".join(responses.read_text().splitlines(keepends=True)[:-1]))
    for shard in (stage / "merged").glob("*.safetensors"):
        shard.unlink()
    later = subprocess.run([sys.executable, str(ROOT / "cli.py"), "stage", "run", "2",
                            "--run-dir", str(run_dir)], capture_output=True, text=True,
                           timeout=300)
    assert later.returncode == 2
    assert "stage 1 is marked done, but its responses step's output responses.jsonl has" \
        in later.stderr
    assert f"stage run 1 --run-dir {run_dir}" in later.stderr
    assert not (run_dir / "stage_2").exists()
    out = run_to_end(run_dir)
    assert "step responses: responses.jsonl has" in out.stdout
    assert "running responses, scores, pairs, decontaminate, train, merge, assess, report " \
           "again" in out.stdout
    assert_same_as_reference(run_dir, reference)
    marker = json.loads((stage / "steps" / "merge.done").read_text())
    assert {"merged/config.json", "merge.json"} <= set(marker["outputs"])
    assert any(rel.endswith(".safetensors") for rel in marker["outputs"])
    assert "step responses: done (skipped)" in run_to_end(run_dir).stdout  # intact now


def test_redo_from_train_with_another_learning_rate(tmp_path, reference):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    bad = subprocess.run(command(run_dir, "--redo-from", "training"), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--redo-from 'training': stage 1 has the steps" in bad.stderr
    out = subprocess.run(command(run_dir, "--redo-from", "train", "--set",
                                 "profile.learning_rate=1e-3", "--accept-changed-settings"),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step pairs: done (skipped)" in out.stdout and "step train: running" in out.stdout
    assert "checkpoints made with other DPO settings or other pairs removed" in out.stdout
    stage = run_dir / "stage_1"
    assert (stage / "pairs.jsonl").read_bytes() == (reference / "stage_1" / "pairs.jsonl").read_bytes()
    ours, theirs = merged_weights(run_dir), merged_weights(reference)
    assert any(not torch.equal(ours[name], theirs[name]) for name in ours)
    # the new merged model is assessed afresh: its greedy outputs are cached under its own
    # weights hash, never read from the cache of the model it replaced
    new_sha = json.loads((stage / "merge.json").read_text())["weights_sha256"]
    old_sha = json.loads((reference / "stage_1" / "merge.json").read_text())["weights_sha256"]
    assert new_sha != old_sha
    cache = stage / "cache" / f"assess_after-{new_sha[:16]}.jsonl"
    after = json.loads((stage / "assessment.json").read_text())["after"]["items"]
    cached = [json.loads(line)["text"].strip() for line in cache.read_text().splitlines()]
    assert sorted(i["response"] for i in after) == sorted(cached)
    assert (stage / "cache" / f"assess_after-{old_sha[:16]}.jsonl").is_file()  # the old one's
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["settings"]["profile"]["learning_rate"] == 1e-3
    kinds = [o["override"] for o in config["overrides"]]
    assert kinds == ["accept_changed_settings", "redo_from"]


def test_a_redo_that_makes_other_pairs_trains_from_scratch(tmp_path, reference):
    """A finished stage keeps its last training checkpoint; pairs made again (here without
    openings) must not resume it: that would train the new pairs on top of the old ones."""
    import hashlib
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    stage = run_dir / "stage_1"
    assert any((stage / "train" / "checkpoints").glob("checkpoint-*"))
    out = subprocess.run(command(run_dir, "--redo-from", "responses", "--set",
                                 "stage1.opened_samples=0", "--accept-changed-settings"),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    pairs = (stage / "pairs.jsonl").read_bytes()
    assert pairs != (reference / "stage_1" / "pairs.jsonl").read_bytes()
    assert "checkpoints made with other DPO settings or other pairs removed" in out.stdout
    recorded = json.loads((stage / "train" / "settings.json").read_text())
    assert recorded["pairs_sha256"] == hashlib.sha256(pairs).hexdigest()


def test_a_run_without_evaluation_sets_says_so_and_its_check_is_incomplete(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "stage", "run", "1", "--run-dir",
                          str(run_dir), "--model", "tiny-qwen2", "--limit", "4", "--heldout", "2",
                          "--baseline-limit", "1", "--no-eval-sets"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "evaluation sets: none (--no-eval-sets)" in out.stdout
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data_dir"] is None
    assert [o["override"] for o in config["overrides"]] == ["no_eval_sets"]
    check = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", "contamination",
                            "--run-dir", str(run_dir)], capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 1
    assert "contamination check INCOMPLETE" in check.stderr and "passed" not in check.stdout


def test_check_contamination_command(reference, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(reference, copy, ignore=shutil.ignore_patterns("merged", "adapter", "train"))
    check = [sys.executable, str(ROOT / "cli.py"), "check", "contamination", "--run-dir", str(copy)]
    ok = subprocess.run(check, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "contamination check passed" in ok.stdout
    pairs = copy / "stage_1" / "pairs.jsonl"
    planted = {"prompt": "Instruction: hi\n\nResponse:\n", "chosen": "<|im_start|>assistant",
               "rejected": "no", "task_id": "planted"}
    pairs.write_text(pairs.read_text() + json.dumps(planted) + "\n")
    bad = subprocess.run(check, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "FAILED" in bad.stderr
    tsv = (copy / "stage_1" / "contamination_check.tsv").read_text()
    assert "template\tchosen\tchat markup" in tsv and "planted" in tsv


def test_override_is_recorded_in_the_config(reference, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    out = subprocess.run(command(copy, "--allow-contamination"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    config = yaml.safe_load((copy / "config.yaml").read_text())
    assert config["allow_contamination"] is True
    assert config["overrides"][0]["override"] == "allow_contamination"
