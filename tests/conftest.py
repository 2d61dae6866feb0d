import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The tiny Qwen2 model, built once under artifacts/ (no download)."""
    from core.models import ensure_tiny_qwen2

    return ensure_tiny_qwen2(ROOT / "artifacts" / "models")


@pytest.fixture(scope="session")
def tiny_backend(tiny_dir):
    from core.backend import load_backend
    from registry.models import profile_by_name

    return load_backend(str(tiny_dir), profile_by_name("tiny-qwen2"))


STAGE1_ARGS = ["--model", "tiny-qwen2", "--limit", "8", "--seed", "0"]


def stage1_command(run_dir: Path, *extra: str) -> list[str]:
    """`stage run 1` on the tiny model, as the stage-1 tests run it."""
    return [sys.executable, str(ROOT / "cli.py"), "stage", "run", "1", "--run-dir", str(run_dir),
            *STAGE1_ARGS, *extra]


@pytest.fixture(scope="session")
def stage1_reference(tmp_path_factory, tiny_dir) -> Path:
    """An uninterrupted stage-1 run on the tiny model, made once per session; tests that change
    a run work on a copy."""
    import subprocess

    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    out = subprocess.run(stage1_command(run_dir), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir
