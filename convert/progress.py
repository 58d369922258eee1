"""Progress bars with ETA on stderr (no dependency); one line per update when stderr is not a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, stream=None, min_interval: float = 0.5):
        self.total, self.desc, self.n = max(total, 1), desc, 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last = time.time()
        self.min_interval = min_interval if self.tty else 10.0
        self._draw(force=True)

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        self._draw(note=note, force=self.n >= self.total)

    def _draw(self, note: str = "", force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.min_interval:
            return
        self.last = now
        elapsed = now - self.start
        frac = self.n / self.total
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * int(24 * frac)
        line = (
            f"{self.desc} [{bar:<24}] {self.n}/{self.total} {elapsed:6.1f}s"
            + (f" eta {eta:6.1f}s" if self.n < self.total and frac > 0 else "")
            + (f"  {note}" if note else "")
        )
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(100))
            if self.n >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
