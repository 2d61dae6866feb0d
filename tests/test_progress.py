"""Progress lines for logs (core/progress.py): printed on a timer when output is not a
terminal, even while no item finishes."""
import io
import time

from core.progress import Progress, duration


def test_lines_come_on_a_timer_even_without_updates():
    stream = io.StringIO()  # not a terminal
    with Progress(10, "stage 1 responses", done=2, interval=0.05, stream=stream) as progress:
        time.sleep(0.3)  # a long batch: nothing finishes, lines still come
        progress.update(3)
        time.sleep(0.12)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 4
    assert lines[0].startswith("stage 1 responses: 2/10 items (20.0%), 0.00 items/s")
    assert any(line.startswith("stage 1 responses: 5/10 items (50.0%)") and "ETA" in line
               for line in lines)
    assert "done in" in lines[-1] and lines[-1].startswith("stage 1 responses: 5/10 items")


def test_a_short_step_prints_nothing():
    stream = io.StringIO()
    with Progress(3, "quick", interval=60, first_line=10, stream=stream) as progress:
        progress.update(3)
    assert stream.getvalue() == ""


def test_durations_read_like_a_clock():
    assert (duration(42), duration(185), duration(3720)) == ("42s", "3m05s", "1h02m")


def test_the_first_line_comes_early_then_one_per_interval():
    stream = io.StringIO()
    with Progress(4, "stage 1 assess", interval=1.0, first_line=0.05, stream=stream):
        time.sleep(0.5)
        assert len(stream.getvalue().splitlines()) == 1  # early, not after a whole interval
        time.sleep(1.0)
    assert len(stream.getvalue().splitlines()) == 3  # first, one interval later, and the last
