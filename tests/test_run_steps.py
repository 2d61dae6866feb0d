"""Done markers list what each step wrote; a resume verifies them before trusting a step."""
import json
from pathlib import Path

from core.run import StageSteps

NAMES = ["a", "b", "c"]


def steps_writing(stage_dir: Path, calls: list[str]) -> list[tuple[str, object]]:
    """Three steps: a writes a.jsonl, b writes b.txt and rewrites a.jsonl, c writes c/out."""
    def a():
        calls.append("a")
        (stage_dir / "a.jsonl").write_text('{"n": 1}\n{"n": 2}\n')

    def b():
        calls.append("b")
        (stage_dir / "b.txt").write_text("bee")
        (stage_dir / "a.jsonl").write_text('{"n": 1}\n{"n": 2}\n{"n": 3}\n')

    def c():
        calls.append("c")
        (stage_dir / "c").mkdir(exist_ok=True)
        (stage_dir / "c" / "out").write_text("sea")
        (stage_dir / "cache").mkdir(exist_ok=True)
        (stage_dir / "cache" / "c.jsonl").write_text("{}\n")  # a cache is not an output

    return [("a", a), ("b", b), ("c", c)]


def run(stage_dir: Path) -> tuple[list[str], list[str]]:
    calls, log = [], []
    stage_dir.mkdir(exist_ok=True)
    StageSteps(stage_dir, NAMES).run(steps_writing(stage_dir, calls), log.append)
    return calls, log


def test_markers_list_each_steps_outputs_with_size_and_hash(tmp_path):
    assert run(tmp_path)[0] == ["a", "b", "c"]
    steps = StageSteps(tmp_path, NAMES)
    assert set(steps.outputs("a")) == {"a.jsonl"}
    assert set(steps.outputs("b")) == {"a.jsonl", "b.txt"}  # b rewrote a.jsonl: now b's
    assert set(steps.outputs("c")) == {"c/out"}
    record = steps.outputs("b")["b.txt"]
    assert record["bytes"] == 3 and len(record["sha256"]) == 64
    assert steps.broken_step() is None
    assert run(tmp_path)[0] == []  # intact: nothing runs again, and a.jsonl is not "changed"


def test_a_truncated_output_reruns_its_step_and_the_later_ones(tmp_path):
    run(tmp_path)
    (tmp_path / "b.txt").write_text("be")
    calls, log = run(tmp_path)
    assert calls == ["b", "c"]
    assert "step b: b.txt has 2 bytes, the step wrote 3; running b, c again" in log


def test_a_changed_or_missing_output_is_found(tmp_path):
    run(tmp_path)
    (tmp_path / "b.txt").write_text("bea")  # same size, other bytes
    assert StageSteps(tmp_path, NAMES).broken_step() == \
        ("b", "b.txt changed since the step wrote it (sha256 differs)")
    (tmp_path / "c" / "out").unlink()
    (tmp_path / "DONE").write_text("stage complete\n")
    assert run(tmp_path)[0] == ["b", "c"]
    assert not (tmp_path / "DONE").exists()  # the stage is not complete until it runs again


def test_markers_from_before_outputs_were_recorded_are_trusted(tmp_path):
    run(tmp_path)
    for name in NAMES:
        marker = StageSteps(tmp_path, NAMES).marker(name)
        marker.write_text(json.dumps({"finished": "2026-11-01T00:00:00", "seconds": 1.0}))
    (tmp_path / "b.txt").unlink()
    assert run(tmp_path)[0] == []
