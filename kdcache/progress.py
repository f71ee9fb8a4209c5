"""A one-line progress display on stderr: done/total, samples/s, MB/s, ETA, and extra fields."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(self, total: int, what: str, enabled: bool, stream: TextIO | None = None, every: float = 0.5):
        self.total, self.what, self.enabled = total, what, enabled
        self.stream = stream or sys.stderr
        self.every = every
        self.done = 0
        self.bytes = 0
        self.start = time.perf_counter()
        self._last = float("-inf")  # the first update draws its line (0.0 did only where perf_counter's clock, the time since
        # boot on Linux, had passed ``every``: a bar of every=3600 on a machine up for less than an hour drew no first line)

    def update(self, n: int, nbytes: int = 0, **fields: Any) -> None:
        """Count ``n`` samples (``nbytes`` bytes); ``fields``: numbers, or 0-d tensors, read only when the line is
        drawn (every ``every`` s): a GPU's value is not waited for at each step."""
        self.done += n
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every or self.done >= self.total):
            self._last = now
            self.stream.write("\r" + self.line(now, fields))
            self.stream.flush()

    def line(self, now: float | None = None, fields: dict[str, Any] | None = None) -> str:
        elapsed = max(1e-9, (now or time.perf_counter()) - self.start)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        parts = [f"{self.what} {self.done}/{self.total}", f"{rate:,.0f} samples/s"]
        if self.bytes:
            parts.append(f"{self.bytes / elapsed / 1e6:,.1f} MB/s")
        parts += [f"{k} {float(v):.4g}" for k, v in (fields or {}).items()]
        parts.append(f"ETA {eta:.0f}s" if eta != float("inf") else "ETA ?")
        return " | ".join(parts) + "   "

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
