"""The CLI: stage list, and one clear error + non-zero exit + nothing written for bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_stage_list_prints_six_stages_in_order():
    out = cli("stage", "list")
    assert out.returncode == 0
    lines = out.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3", "4", "5", "6"]
    assert "explicit-instructions" in lines[0] and "learns to" in lines[0]
    assert "constitutional-integration" in lines[5]


def _assert_clean_failure(out, run_dir: Path, *phrases: str):
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("error:") == 1 and "Traceback" not in out.stderr
    for phrase in phrases:
        assert phrase in out.stderr
    assert not run_dir.exists()


def test_bad_constitution(tmp_path):
    bad = tmp_path / "constitution.yaml"
    bad.write_text("version: 0\nprinciples:\n  - name: Bad Name\n    category: helpfull\n")
    run_dir = tmp_path / "run"
    out = cli("stage", "run", "1", "--model", "tiny-qwen2", "--run-dir", str(run_dir),
              "--constitution", str(bad))
    _assert_clean_failure(out, run_dir, "is invalid", "version", "principles[0].category")


def test_unknown_profile(tmp_path):
    out = cli("stage", "run", "1", "--model", "no-such-model", "--run-dir", str(tmp_path / "run"))
    _assert_clean_failure(out, tmp_path / "run", "'no-such-model' is not a profile", "tiny-qwen2")


def test_missing_model_path(tmp_path):
    out = cli("stage", "run", "1", "--model", str(tmp_path / "nowhere" / "merged"),
              "--run-dir", str(tmp_path / "run"))
    _assert_clean_failure(out, tmp_path / "run", "not an existing local directory")


def test_directory_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    out = cli("stage", "run", "1", "--model", str(tmp_path / "empty"), "--run-dir",
              str(tmp_path / "run"))
    _assert_clean_failure(out, tmp_path / "run", "holds no config.json")


@pytest.mark.parametrize("number, phrase", [(7, "there is no stage 7"), (0, "there is no stage 0")])
def test_wrong_stage_number(tmp_path, number, phrase):
    out = cli("stage", "run", str(number), "--model", "tiny-qwen2", "--run-dir",
              str(tmp_path / "run"))
    _assert_clean_failure(out, tmp_path / "run", phrase)


def test_bad_set_override(tmp_path):
    out = cli("stage", "run", "1", "--model", "tiny-qwen2", "--run-dir", str(tmp_path / "run"),
              "--set", "stage1.max_judged_samples=lots", "--set", "stage1.nope=1")
    _assert_clean_failure(out, tmp_path / "run", "expected an integer", "has no setting 'nope'")


def test_non_positive_limit_names_the_option(tmp_path):
    out = cli("stage", "run", "1", "--model", "tiny-qwen2", "--run-dir", str(tmp_path / "run"),
              "--baseline-limit", "0")
    _assert_clean_failure(out, tmp_path / "run", "--baseline-limit must be a number from 1 to")


@pytest.mark.parametrize("option, value", [("--limit", "1000000000"), ("--heldout", "0"),
                                           ("--limit", "-3")])
def test_counts_are_bounded_before_anything_is_written(tmp_path, option, value):
    out = cli("stage", "run", "1", "--model", "tiny-qwen2", "--run-dir", str(tmp_path / "run"),
              option, value)
    _assert_clean_failure(out, tmp_path / "run", f"{option} must be a number from 1 to 100,000")


def test_a_run_dir_that_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory")
    out = cli("stage", "run", "1", "--model", "tiny-qwen2", "--run-dir", str(path))
    assert out.returncode == 2 and "is a file, not a directory" in out.stderr
    assert "Traceback" not in out.stderr and path.read_text() == "not a directory"


def test_a_model_directory_with_a_corrupt_config(tmp_path, tiny_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "config.json").write_text('{"model_type": "qwen2", ')
    out = cli("stage", "run", "1", "--model", str(model), "--run-dir", str(tmp_path / "run"))
    _assert_clean_failure(out, tmp_path / "run", "config.json is not valid JSON")


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_run_dir(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    out = cli("stage", "run", "1", "--model", "tiny-qwen2", "--run-dir", str(parent / "run"))
    parent.chmod(0o755)
    _assert_clean_failure(out, parent / "run", "is not writable")


def test_until_out_of_range(tmp_path):
    out = cli("run", "--model", "tiny-qwen2", "--run-dir", str(tmp_path / "run"), "--until", "9")
    _assert_clean_failure(out, tmp_path / "run", "--until must name a stage from 1 to 6")


def test_config_show_lists_every_section_with_help():
    out = cli("config", "show", "--model", "tiny-qwen2", "--set", "stage2.oversample=2.0")
    assert out.returncode == 0, out.stderr
    for section in ("run:", "profile:", "stage1:", "stage6:"):
        assert f"\n{section}" in out.stdout
    assert "learning_rate:" in out.stdout and "# ROUGE-L" in out.stdout


def test_set_reads_exponent_numbers_the_way_users_write_them():
    # YAML 1.1 reads 1e-5 (no dot) as text; a float setting must still take it.
    out = cli("config", "show", "--model", "tiny-qwen2", "--set", "profile.learning_rate=1e-5")
    assert out.returncode == 0, out.stderr
    assert "learning_rate: 1e-05" in out.stdout
    bad = cli("config", "show", "--model", "tiny-qwen2", "--set", "profile.learning_rate=fast")
    assert bad.returncode == 2 and "expected a number, got 'fast'" in bad.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_profile_without_cuda(tmp_path):
    out = cli("stage", "run", "1", "--model", "qwen2.5-32b", "--run-dir", str(tmp_path / "run"))
    _assert_clean_failure(out, tmp_path / "run", "needs a CUDA GPU")


def test_assess_writes_json_and_prints_a_table(tmp_path):
    out = tmp_path / "result.json"
    run = cli("assess", "--model", "tiny-qwen2", "--suite", "baseline", "--limit", "1",
              "--out", str(out), "--max-new-tokens", "8")
    assert run.returncode == 0, run.stderr
    import json

    result = json.loads(out.read_text())
    assert result["suite"] == "baseline" and result["summary"]["judging"]["n"] == 1
    assert "bare_questions" in run.stdout and "written:" in run.stdout
    again = cli("assess", "--model", "tiny-qwen2", "--suite", "baseline", "--limit", "1",
                "--out", str(tmp_path / "b.json"), "--max-new-tokens", "8", "--compare-to", str(out))
    assert again.returncode == 0 and "paired vs" in again.stdout


def test_assess_without_ifeval_data_fails_clearly(tmp_path):
    out = cli("assess", "--model", "tiny-qwen2", "--suite", "ifeval", "--data-dir", str(tmp_path))
    assert out.returncode == 2 and "google/IFEval" in out.stderr and "Traceback" not in out.stderr


def test_status_of_a_folder_that_is_not_a_run(tmp_path):
    out = cli("status", "--run-dir", str(tmp_path))
    assert out.returncode == 2 and "is not a run directory" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_a_locked_run_names_the_holder(tmp_path):
    from core.run import RunDirError, RunLock

    with RunLock(tmp_path / ".lock"):
        with pytest.raises(RunDirError, match=r"in use by another command \(pid \d+ since 20"):
            with RunLock(tmp_path / ".lock"):
                pass
    with RunLock(tmp_path / ".lock"):  # released: the next command gets it
        pass


@pytest.mark.slow
def test_ctrl_c_keeps_work_and_prints_the_resume_command(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "run"
    args = [sys.executable, str(ROOT / "cli.py"), "stage", "run", "1", "--model", "tiny-qwen2",
            "--limit", "8", "--run-dir", str(run_dir)]
    # as from a shell: SIGINT not ignored, whatever an earlier test left in this process
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "stage_1" / "steps").is_dir():
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted: finished work is kept" in stderr and "Traceback" not in stderr
    assert f"stage run 1 --model tiny-qwen2 --limit 8 --run-dir {run_dir}" in stderr
    assert (run_dir / "stage_1" / "steps" / "instructions.done").is_file()
    status = cli("status", "--run-dir", str(run_dir))
    assert status.returncode == 0
    assert "stage 1 (explicit-instructions): not done" in status.stdout
    assert "last attempt stopped in step " in status.stdout and "KeyboardInterrupt" in status.stdout


DATA = ROOT.parent / "shared" / "data"


def damaged_data_dir(tmp_path: Path) -> Path:
    """A copy of the three evaluation sets, each damaged the way a careless copy damages it."""
    import shutil

    data = tmp_path / "data"
    for rel in ("ifeval/input_data.jsonl",
                "ailuminate/airr_official_1.0_demo_en_us_prompt_set_release.csv",
                "hh-rlhf-harmless/harmless-base-test.jsonl.gz"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / rel, data / rel)
    ifeval = data / "ifeval" / "input_data.jsonl"
    ifeval.write_bytes(ifeval.read_bytes()[:-40])  # the last line cut mid-JSON
    csv_path = data / "ailuminate" / "airr_official_1.0_demo_en_us_prompt_set_release.csv"
    csv_path.write_text(csv_path.read_text().replace("prompt_text", "text", 1))
    harmless = data / "hh-rlhf-harmless" / "harmless-base-test.jsonl.gz"
    harmless.write_bytes(harmless.read_bytes()[: 50_000])  # a download that stopped
    return data


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_damaged_evaluation_sets_are_refused_before_anything_runs(tmp_path):
    run_dir = tmp_path / "run"
    out = cli("stage", "run", "1", "--model", "tiny-qwen2", "--run-dir", str(run_dir),
              "--data-dir", str(damaged_data_dir(tmp_path)))
    lines = (ROOT.parent / "shared" / "data" / "ifeval" / "input_data.jsonl").read_text()
    last = len(lines.splitlines())
    _assert_clean_failure(out, run_dir, f"input_data.jsonl:{last}: not a JSON line",
                          "the header has no column 'prompt_text'",
                          "harmless-base-test.jsonl.gz: cannot be decompressed",
                          "--no-eval-sets")


def test_data_dir_that_is_not_a_directory_and_contradictory_options(tmp_path):
    run_dir = tmp_path / "run"
    out = cli("stage", "run", "1", "--model", "tiny-qwen2", "--run-dir", str(run_dir),
              "--data-dir", str(tmp_path / "nowhere"))
    _assert_clean_failure(out, run_dir, "is not a directory")
    out = cli("stage", "run", "1", "--model", "tiny-qwen2", "--run-dir", str(run_dir),
              "--data-dir", str(tmp_path), "--no-eval-sets")
    _assert_clean_failure(out, run_dir, "contradict")
