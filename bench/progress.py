"""A dependency-free progress bar on stderr."""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


# Without a terminal (logs, pipes) a line at most this often: one per event
# wrote thousands of lines into a log of `make bench`.
LOG_INTERVAL_S = 10.0


class Progress:
    """Redraws one line in a terminal; elsewhere (logs, pipes) prints a line
    at most every LOG_INTERVAL_S seconds, and the last one."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 28) -> None:
        self.total, self.done, self.stream, self.width = max(total, 1), 0, stream, width
        self.start = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._last_len = 0
        self._last_logged: float | None = None

    def _line(self, label: str) -> str:
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        pct = 100 * self.done / self.total
        return (f"[{bar}] {self.done:>{len(str(self.total))}}/{self.total} {pct:3.0f}% "
                f"{_clock(time.perf_counter() - self.start)} {label}")

    def show(self, label: str, force: bool = False) -> None:
        """Shows what runs now (before it runs)."""
        line = self._line(label)
        if self.tty:
            self.stream.write("\r" + line.ljust(self._last_len))
            self._last_len = len(line)
        else:
            now = time.perf_counter()
            if not force and self._last_logged is not None and now - self._last_logged < LOG_INTERVAL_S:
                return
            self._last_logged = now
            self.stream.write(line + "\n")
        self.stream.flush()

    def advance(self) -> None:
        self.done = min(self.done + 1, self.total)

    def close(self, label: str = "done") -> None:
        self.done = self.total
        self.show(label, force=True)
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()
