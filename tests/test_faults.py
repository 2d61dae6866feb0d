"""Environment faults: a full disk gives one `error:` line and exit 1, never a traceback, and a
step that would not fit is refused before it starts writing."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from core.errors import RunFailure
from core.lifecycle import check_free_space, weights_bytes

ROOT = Path(__file__).resolve().parent.parent


def test_a_step_that_would_not_fit_is_refused_with_the_sizes(tmp_path):
    with pytest.raises(RunFailure, match=r"the merge needs about .* GiB free in .* and the disk "
                                         r"has .* [GM]iB; free space and rerun the same command"):
        check_free_space(tmp_path / "stage_1", 2**62, "the merge")
    check_free_space(tmp_path / "stage_1", 1, "the merge")  # fits: no error


def test_weights_bytes_counts_safetensors(tiny_dir):
    assert weights_bytes(str(tiny_dir)) == sum(p.stat().st_size
                                               for p in Path(tiny_dir).glob("*.safetensors")) > 0
    assert weights_bytes("Qwen/Qwen2.5-32B") == 0  # a Hub id: unknown here


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0 or os.geteuid() != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_error_line_and_resumable(small_disk, tiny_dir):
    run_dir = small_disk / "run"
    command = [sys.executable, str(ROOT / "cli.py"), "stage", "run", "1", "--run-dir",
               str(run_dir), "--model", "tiny-qwen2", "--limit", "8"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stderr.count("error:") == 1
    assert ("error: the disk is full" in out.stderr or "free space and rerun" in out.stderr)
    assert (run_dir / "config.yaml").is_file()
    assert not (run_dir / "stage_1" / "DONE").exists()
