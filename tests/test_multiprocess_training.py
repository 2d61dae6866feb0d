"""DPO under `accelerate launch` with two CPU processes (profile.accelerate_config), through the
stage's own train step, and the refusals of a config that cannot launch."""
from __future__ import annotations

import json
import shutil
import subprocess

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli import main
from conftest import ROOT, stage1_command

TWO_CPU_PROCESSES = str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml")


def adapter_weights(run_dir):
    return load_file(str(run_dir / "stage_1" / "adapter" / "adapter_model.safetensors"))


def test_dpo_in_two_cpu_processes_under_accelerate_launch(tmp_path, stage1_reference):
    run_dir = tmp_path / "run"
    shutil.copytree(stage1_reference, run_dir)
    out = subprocess.run(stage1_command(run_dir, "--redo-from", "train", "--set",
                                        f"profile.accelerate_config={TWO_CPU_PROCESSES}",
                                        "--accept-changed-settings"),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    train = run_dir / "stage_1" / "train"
    metrics = json.loads((train / "dpo_metrics.json").read_text())
    assert metrics["processes"] == 2
    single = json.loads((stage1_reference / "stage_1" / "train" / "dpo_metrics.json").read_text())
    assert "processes" not in single or single["processes"] == 1
    # two processes each take a batch per step: half the optimizer steps of one process
    assert metrics["steps"] < single["steps"]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in metrics["per_step"])
    ours, theirs = adapter_weights(run_dir), adapter_weights(stage1_reference)
    assert ours.keys() == theirs.keys()
    lora_b = [w for name, w in ours.items() if "lora_B" in name]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # trained: B starts at zero
    assert not (run_dir / "stage_1" / "adapter" / "training_args.bin").exists()
    assert (run_dir / "stage_1" / "DONE").is_file()  # merge, assess and report ran on it
    config = (run_dir / "config.yaml").read_text()
    assert f"accelerate_config: {TWO_CPU_PROCESSES}" in config


def test_an_accelerate_config_that_cannot_launch_is_refused_before_anything_runs(tmp_path):
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("distributed_type: [MULTI_GPU\n")
    not_accelerate = tmp_path / "other.yaml"
    not_accelerate.write_text("learning_rate: 1\n")
    cases = [(tmp_path / "missing.yaml", "no such file"), (not_yaml, "not valid YAML"),
             (not_accelerate, "not an accelerate config")]
    for path, message in cases:
        run_dir = tmp_path / f"run-{path.stem}"
        result = CliRunner().invoke(main, ["stage", "run", "1", "--model", "tiny-qwen2",
                                           "--limit", "2", "--run-dir", str(run_dir), "--set",
                                           f"profile.accelerate_config={path}"])
        assert result.exit_code == 2, result.output
        assert f"profile.accelerate_config={path}: {message}" in result.output
        assert not (run_dir / "stage_1").exists()
    result = CliRunner().invoke(main, ["stage", "run", "1", "--model", "tiny-qwen2", "--limit",
                                       "2", "--run-dir", str(tmp_path / "run-unsloth"),
                                       "--set", f"profile.accelerate_config={TWO_CPU_PROCESSES}",
                                       "--set", "profile.backend=unsloth"])
    assert result.exit_code == 2 and "--set profile.backend=hf" in result.output
