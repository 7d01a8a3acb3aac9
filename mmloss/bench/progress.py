"""Progress of a sweep on stderr: a one-line bar (tqdm when installed) that table lines are
written above; silent when stderr is not a terminal."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr (tqdm when installed); silent when stderr is not a TTY."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled and total > 1
        self.started = time.monotonic()
        self.bar = None
        self.label = ""
        if self.enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="config", file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                self.bar = None

    def write(self, text: str) -> None:
        if self.enabled and self.bar is not None:
            self.bar.write(text, file=sys.stdout)
            return
        if self.enabled:
            sys.stderr.write("\r\033[K")
        print(text, flush=True)
        self._draw()

    def describe(self, label: str) -> None:
        self.label = label
        if self.bar is not None:
            self.bar.set_description(label)
        self._draw()

    def advance(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled or self.bar is not None:
            return
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.monotonic() - self.started
        sys.stderr.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:.0f} s  {self.label}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
