"""Progress a user can follow in a log file as well as on a terminal.

On a terminal a long step shows a tqdm bar. When output goes to a file (`nohup`, `tmux` with a
pipe, a job scheduler) tqdm bars switch themselves off, so a slow step looks hung; there a
background thread prints a line after `first_line` seconds and then every `interval` seconds,
whether or not an item has finished since (a CPU batch of long sequences can take minutes):

    stage 1 responses: 48/256 items (18.8%), 0.41 items/s, ETA 8m27s
"""
from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

LOG_INTERVAL = 30.0  # seconds between progress lines when output is not a terminal
FIRST_LINE = 5.0  # the first line comes this soon, so the time spent before a step's progress
                  # starts (loading a model) does not stretch the first gap beyond LOG_INTERVAL


def duration(seconds: float) -> str:
    """3m05s, 1h02m, 42s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Items done of `total`: a tqdm bar on a terminal, a line every `interval` seconds
    otherwise, and a last line when closed. Use as a context manager."""

    def __init__(self, total: int, desc: str, done: int = 0, unit: str = "item",
                 interval: float = LOG_INTERVAL, stream: TextIO | None = None,
                 first_line: float = FIRST_LINE):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.first_line = min(first_line, interval)
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.start_done = done
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = None
        self._thread = None
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=done, desc=desc, unit=unit, file=self.stream)
        else:
            self._thread = threading.Thread(target=self._report, daemon=True)
            self._thread.start()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def line(self) -> str:
        """`desc: done/total units (share), rate, ETA` as of now."""
        with self._lock:
            done = self.done
        elapsed = time.monotonic() - self.started
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        share = f" ({done / self.total:.1%})" if self.total else ""
        eta = f", ETA {duration((self.total - done) / rate)}" if rate > 0 and done < self.total \
            else ""
        return (f"{self.desc}: {done}/{self.total} {self.unit}s{share}, {rate:.2f} "
                f"{self.unit}s/s{eta}")

    def _report(self) -> None:
        wait = self.first_line
        while not self._stop.wait(wait):
            self._print(self.line())
            wait = self.interval

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            return
        self._stop.set()
        self._thread.join()
        if time.monotonic() - self.started >= self.first_line:
            self._print(self.line() + f", done in {duration(time.monotonic() - self.started)}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
