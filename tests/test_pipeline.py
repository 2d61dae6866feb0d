"""Stage chaining and run-directory rules (no model needed)."""
import json

import pytest

from registry.models import resolve_model
from core.models import weights_sha256
from app.pipeline import StageSelectionError, record_input, stage_input


def test_stage_one_starts_from_the_run_model(tmp_path, tiny_dir):
    resolved = resolve_model(str(tiny_dir), has_cuda=False)
    path, origin = stage_input(1, tmp_path, resolved, explicit=False)
    assert path == str(tiny_dir.resolve()) and origin == "the run's model"


def test_later_stage_learns_from_the_previous_merged_model(tmp_path, tiny_dir):
    resolved = resolve_model(str(tiny_dir), has_cuda=False)
    with pytest.raises(StageSelectionError, match="stage 1 is not done"):
        stage_input(2, tmp_path, resolved, explicit=False)
    path, origin = stage_input(2, tmp_path, resolved, explicit=True)  # an explicit --model
    assert path == str(tiny_dir.resolve()) and "--model" in origin
    (tmp_path / "stage_1").mkdir()
    (tmp_path / "stage_1" / "DONE").write_text("done\n")
    path, origin = stage_input(2, tmp_path, resolved, explicit=True)
    assert path == str(tmp_path / "stage_1" / "merged") and origin == "stage 1's merged model"


def test_weights_hash_is_recorded_once(tmp_path, tiny_dir):
    from core.context import StageContext
    from core.constitution import load_constitution
    from core.models import PROJECT_ROOT
    from registry.models import profile_by_name

    ctx = StageContext(run_dir=tmp_path, number=1, model_path=str(tiny_dir), origin="test",
                       profile=profile_by_name("tiny-qwen2"), seed=0, limit=1, heldout=1,
                       constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"))
    record_input(ctx, "test")
    recorded = (tmp_path / "stage_1" / "input.json").read_text()
    assert weights_sha256(str(tiny_dir)) in recorded
    ctx.model_path = str(tmp_path)
    from core.run import RunDirError

    with pytest.raises(RunDirError, match="was started from"):
        record_input(ctx, "test")
    assert weights_sha256("Qwen/Qwen2.5-32B") is None


def test_a_moved_run_directory_resumes_from_its_moved_model(tmp_path, tiny_dir):
    import shutil

    from core.constitution import load_constitution
    from core.context import StageContext
    from core.models import PROJECT_ROOT
    from core.run import RunDirError
    from registry.models import profile_by_name

    ctx = StageContext(run_dir=tmp_path / "run", number=2, model_path=str(tiny_dir),
                       origin="test", profile=profile_by_name("tiny-qwen2"), seed=0, limit=1,
                       heldout=1, constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                       log=lambda _: None)
    record_input(ctx, "test")
    moved = tmp_path / "elsewhere" / "merged"
    shutil.copytree(tiny_dir, moved)
    ctx.model_path = str(moved)
    record_input(ctx, "test")  # the same weights at a new path: accepted
    recorded = json.loads((tmp_path / "run" / "stage_2" / "input.json").read_text())
    assert recorded["path"] == str(moved)
    assert recorded["weights_sha256"] == weights_sha256(str(tiny_dir))
    other = tmp_path / "other" / "merged"
    shutil.copytree(tiny_dir, other)
    with open(other / "model.safetensors", "r+b") as f:  # other weights: refused
        f.seek(-1, 2)
        last = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([last ^ 1]))
    ctx.model_path = str(other)
    with pytest.raises(RunDirError, match="was started from"):
        record_input(ctx, "test")
