"""The stage contract: a new stage is one module plus one line in the curriculum, the lifecycle
adds the shared tail, and every setting a run uses is typed, saved, shown and pinned on resume."""
import pytest
import yaml

from app.pipeline import (StageSelectionError, describe_settings, plan_stage_run, run_stage,
                          run_status)
from core.config import SettingsError
from core.io import read_json, read_jsonl
from core.models import PROJECT_ROOT
from core.run import RunDirError, write_config
from core.scripted import Script, ScriptedBackend
from core.stage import SHARED_TAIL, Stage, Step
from registry.stages import STAGES
from tests.toy import stage7_echo

CONSTITUTION = PROJECT_ROOT / "constitution.yaml"


def plan(run_dir, tiny_dir, number=1, **options):
    options.setdefault("log", lambda _: None)
    return plan_stage_run(number, run_dir, str(tiny_dir), 4, 0, None, CONSTITUTION, **options)


def toy_script() -> Script:
    """Training requests get one complete sentence and one broken-off answer each; everything
    else (held-out assessment, probes) is the tiny model's own."""
    seen: dict[str, int] = {}
    training = {f"{r}" for r in stage7_echo.REQUESTS}

    def complete(prompt: str) -> str | None:
        request = next((r for r in training if r in prompt), None)
        if request is None:
            return None
        seen[request] = seen.get(request, 0) + 1
        return " It is a fine day." if seen[request] % 2 else " it is a fine"
    return Script(complete=complete)


@pytest.mark.slow
def test_a_toy_seventh_stage_runs_through_the_real_lifecycle(tmp_path, tiny_dir):
    curriculum = STAGES + (stage7_echo.STAGE,)  # registering the stage: one line
    run_dir = run_stage(7, tmp_path / "run", model="tiny-qwen2", seed=0, log=lambda _: None,
                        baseline_limit=1, curriculum=curriculum,
                        backend_loader=ScriptedBackend.loader(toy_script()))
    stage_dir = run_dir / "stage_7"
    assert (stage_dir / "DONE").is_file()
    pairs = read_jsonl(stage_dir / "pairs.jsonl")
    assert len(pairs) == len(stage7_echo.REQUESTS)
    assert all(p["chosen"].strip().endswith(".") and not p["rejected"].strip().endswith(".")
               for p in pairs)
    for step in ("responses", "pairs") + SHARED_TAIL:
        assert (stage_dir / "steps" / f"{step}.done").is_file()
    assert (stage_dir / "merged" / "config.json").is_file()
    metrics = read_json(stage_dir / "metrics.json")
    assert metrics["name"] == "toy-echo" and metrics["data"]["responses"] == 12
    assert "ends_with_period" in metrics["assessment"]["before"]["summary"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["settings"]["stage7"] == {"samples_per_request": 2, "temperature": 1.0}
    rows = {row.number: row for row in run_status(run_dir, curriculum)}
    assert rows[7].state == "DONE" and [s for s, _, _ in rows[7].steps] == ["responses", "pairs",
                                                                            *SHARED_TAIL]


def test_stage_steps_may_not_shadow_the_shared_tail():
    step = stage7_echo.STAGE.data_steps[0]
    with pytest.raises(ValueError, match="shared tail"):
        Stage(number=8, name="x", summary="x", data_steps=(step, Step("train", step.action)),
              protected=stage7_echo.protected_sets, merge_probes=stage7_echo.merge_probes,
              assess_heldout=stage7_echo.assess_heldout, headline="h",
              report_data=stage7_echo.report_data, plan_work=stage7_echo.plan_work)


def test_every_stage_declares_typed_settings_and_the_shared_tail():
    assert [s.number for s in STAGES] == [1, 2, 3, 4, 5, 6]
    for stage in STAGES:
        assert stage.step_names[-len(SHARED_TAIL):] == list(SHARED_TAIL)
        assert len(stage.data_steps) >= 1
        stage.settings()  # every field has a default


def test_unknown_stage_is_a_usage_error():
    with pytest.raises(StageSelectionError, match="there is no stage 9"):
        plan_stage_run(9, None, "tiny-qwen2", None, None, None, CONSTITUTION)


def test_config_yaml_holds_every_setting_and_set_overrides(tmp_path, tiny_dir):
    _, ctx, config = plan(tmp_path, tiny_dir, overrides=("stage1.max_judged_samples=2",
                                                         "profile.learning_rate=0.001"))
    assert ctx.settings.max_judged_samples == 2 and ctx.profile.learning_rate == 0.001
    assert set(config["settings"]) == {"run", "profile"} | {s.key for s in STAGES}
    assert config["settings"]["stage1"]["max_judged_samples"] == 2
    assert config["settings"]["stage1"]["constraint_count_weights"] == [0.2, 0.5, 0.3]
    assert config["set"] == ["stage1.max_judged_samples=2", "profile.learning_rate=0.001"]
    assert not (tmp_path / "config.yaml").exists()  # planning writes nothing


def test_bad_set_overrides_are_all_reported_at_once(tmp_path, tiny_dir):
    with pytest.raises(SettingsError) as error:
        plan(tmp_path, tiny_dir, overrides=("stage1.max_judged_samples=many", "stage9.x=1",
                                            "stage1.nope=1", "profile.name=x", "broken"))
    message = str(error.value)
    for phrase in ("stage1.max_judged_samples: expected an integer", "section 'stage9'",
                   "no setting 'nope'", "profile.name cannot be set", "'broken': expected"):
        assert phrase in message
    assert list(tmp_path.iterdir()) == []


def test_resuming_with_a_changed_setting_is_refused_by_name(tmp_path, tiny_dir):
    _, _, config = plan(tmp_path, tiny_dir, overrides=("stage1.max_judged_samples=2",))
    write_config(tmp_path, config)
    _, ctx, _ = plan(tmp_path, tiny_dir)  # the recorded --set carries over
    assert ctx.settings.max_judged_samples == 2
    with pytest.raises(RunDirError, match=r"stage1\.max_judged_samples: the run has 2"):
        plan(tmp_path, tiny_dir, overrides=("stage1.max_judged_samples=3",))
    _, ctx, config = plan(tmp_path, tiny_dir, overrides=("stage1.max_judged_samples=3",),
                          accept_changed=True)
    assert ctx.settings.max_judged_samples == 3
    assert config["overrides"][-1]["override"] == "accept_changed_settings"
    assert "stage1.max_judged_samples" in config["overrides"][-1]["changes"][0]


def test_an_edited_default_is_caught_on_resume(tmp_path, tiny_dir):
    _, _, config = plan(tmp_path, tiny_dir)
    config["settings"]["run"]["near_duplicate"] = 0.5  # as if the default had been edited since
    write_config(tmp_path, config)
    with pytest.raises(RunDirError, match=r"run\.near_duplicate: the run has 0\.5"):
        plan(tmp_path, tiny_dir)


def test_config_show_prints_values_and_help(tmp_path, tiny_dir):
    lines = describe_settings(None, "tiny-qwen2", ("stage1.oversample=2.0",))
    text = "\n".join(lines)
    assert "stage1:" in text and "oversample: 2.0" in text
    assert "near_duplicate: 0.7  # ROUGE-L" in text
    _, _, config = plan(tmp_path, tiny_dir, overrides=("stage1.max_judged_samples=2",))
    write_config(tmp_path, config)
    shown = "\n".join(describe_settings(tmp_path, None))
    assert "max_judged_samples: 2" in shown and f"# settings of {tmp_path}" in shown


def test_a_stage_checks_its_own_settings_and_leaves_started_stages_records_alone(tmp_path,
                                                                                 tiny_dir):
    _, _, config = plan(tmp_path, tiny_dir)
    config["settings"]["stage3"]["max_judged_samples"] = 5  # as if stage 3's default had changed
    write_config(tmp_path, config)
    _, _, resumed = plan(tmp_path, tiny_dir)  # stage 1 does not depend on stage 3's settings
    assert resumed["settings"]["stage3"]["max_judged_samples"] == 3  # not started: today's
    (tmp_path / "stage_3").mkdir()
    _, _, resumed = plan(tmp_path, tiny_dir)
    assert resumed["settings"]["stage3"]["max_judged_samples"] == 5  # started: as it was made
    with pytest.raises(RunDirError, match=r"stage3\.max_judged_samples: the run has 5"):
        plan(tmp_path, tiny_dir, number=3)


def test_a_stages_input_model_must_stay_the_one_it_started_from(tmp_path, tiny_dir):
    import os
    import shutil

    from app.pipeline import record_input

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    run_dir = tmp_path / "run"
    _, ctx, _ = plan(run_dir, model)
    record_input(ctx, "the run's model")
    weights = next(model.glob("*.safetensors"))
    os.utime(weights)  # touched (a copy, a restore): rehashed once, same weights, accepted
    logged = []
    _, ctx, _ = plan(run_dir, model, log=logged.append)
    record_input(ctx, "the run's model")
    assert any("checking their hash" in line for line in logged)
    record_input(ctx, "the run's model")  # the new times are recorded: no second rehash
    assert sum("checking their hash" in line for line in logged) == 1
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # other weights of the same size
    weights.write_bytes(bytes(data))
    with pytest.raises(RunDirError, match="is not the model this stage started from"):
        record_input(ctx, "the run's model")
