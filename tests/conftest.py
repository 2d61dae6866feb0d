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
