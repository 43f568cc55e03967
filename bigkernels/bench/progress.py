"""A one-line progress bar on stderr (stdout stays clean for the table). On a terminal the line is
redrawn in place; in a log file each new case gets its own line instead of a stream of updates."""
from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from bigkernels.bench.cases import Case

BAR_WIDTH = 24


class ProgressBar:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.interactive = stream.isatty()
        self.start = time.perf_counter()
        self.last_case: str | None = None
        self.width = 0

    def __call__(self, done: int, total: int, case: Case, what: str) -> None:
        filled = BAR_WIDTH * done // max(total, 1)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        elapsed = time.perf_counter() - self.start
        if what == "done":
            text = f"[{bar}] {done}/{total} cases in {elapsed:.0f} s"
        else:
            text = f"[{bar}] {done + 1}/{total} {elapsed:4.0f}s {case.id}: {what}"
        if self.interactive:
            # A wrapped line cannot be redrawn with \r: cut it to the terminal, pad over the last one.
            text = text[: shutil.get_terminal_size().columns - 1]
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
            if what == "done":
                self.stream.write("\n")
        elif what == "done" or case.id != self.last_case:
            self.stream.write(text + "\n")
        self.last_case = case.id
        self.stream.flush()
