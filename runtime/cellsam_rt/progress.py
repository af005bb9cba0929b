"""A dependency-free progress bar for the command line (silent when stderr is not a terminal)."""
from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class ProgressBar:
    """One redrawn status line: "[#####.....] 3/10 name  tile 4/16  12.3s"."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None,
                 min_interval: float = 0.1):
        """Draw on `stream` (stderr) only when it is a terminal, unless `enabled` says otherwise."""
        self.total = max(int(total), 0)
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = isatty() if enabled is None else enabled
        self.min_interval = min_interval
        self.done = 0
        self.label = ""
        self.detail = ""
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False

    def start_item(self, label: str) -> None:
        """Show that work on item `label` has begun."""
        self.label, self.detail = label, ""
        self._draw(force=True)

    def sub_progress(self, done: int, total: int, what: str = "tile") -> None:
        """Report progress inside the current item (e.g. tiles of a large image)."""
        # A whole image reports 1/1: not worth a label.
        self.detail = f"{what} {done}/{total}" if total > 1 else ""
        self._draw(force=done >= total)

    def advance(self, n: int = 1) -> None:
        """Mark `n` items finished."""
        self.done = min(self.done + n, self.total)
        self.detail = ""
        self._draw(force=True)

    def clear(self) -> None:
        """Erase the bar from the terminal line."""
        if self.enabled and self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        """Leave the terminal on a fresh line."""
        self.clear()

    def render(self, width: int = 80) -> str:
        """The status line for the current state, fitted to `width` columns."""
        elapsed = time.perf_counter() - self._start
        counts = f" {self.done}/{self.total}"
        tail = " ".join(s for s in (self.label, self.detail, f"{elapsed:.1f}s") if s)
        bar_width = max(10, min(30, width - len(counts) - len(tail) - 4))
        filled = int(bar_width * self.done / self.total) if self.total else bar_width
        line = f"[{'#' * filled}{'.' * (bar_width - filled)}]{counts} {tail}"
        return line[: max(width - 1, 0)]

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        width = shutil.get_terminal_size((80, 20)).columns
        self.stream.write("\r\033[K" + self.render(width))
        self.stream.flush()
        self._drawn = True
