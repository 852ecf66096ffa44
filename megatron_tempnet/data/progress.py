"""Progress and throughput of a preprocessing run: a tqdm bar on stderr, and the figures at the end."""
from __future__ import annotations

import sys
import time
from typing import Optional

_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MB [{elapsed}<{remaining}{postfix}]"


class Progress:
    """A tqdm bar in MB of input (when enabled) and the run's throughput figures."""

    def __init__(self, enabled: bool, total_bytes: Optional[int], t0: Optional[float] = None):
        """t0: when the run began (time.time()), so the figures count its set-up too."""
        self.bar = None
        self.t0 = time.time() if t0 is None else t0
        self.docs = self.tokens = self.bytes = 0
        self._last = 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=None if total_bytes is None else round(total_bytes / 1e6, 3), unit="MB", desc="preprocess",
                file=sys.stderr, mininterval=1.0, dynamic_ncols=True,
                bar_format=_BAR_FORMAT if total_bytes else "{desc}: {n:.1f} MB [{elapsed}{postfix}]",
            )

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        if self.bar is None:
            return
        self.bar.update(nbytes / 1e6)
        now = time.time()
        if now - self._last >= 1.0:
            self._last = now
            dt = max(now - self.t0, 1e-9)
            self.bar.set_postfix_str(
                f"{self.docs / dt:,.0f} docs/s, {self.bytes / dt / 1e6:,.1f} MB/s, {self.tokens / dt:,.0f} tok/s",
                refresh=False,
            )

    def close(self, success: bool = False) -> dict:
        if self.bar is not None:
            if success and self.bar.total:
                self.bar.n = self.bar.total
                self.bar.refresh()
            self.bar.close()
        dt = max(time.time() - self.t0, 1e-9)
        return {
            "seconds": round(dt, 3),
            "docs": self.docs,
            "tokens": self.tokens,
            "input_bytes": self.bytes,
            "docs_per_s": round(self.docs / dt, 1),
            "mb_per_s": round(self.bytes / dt / 1e6, 3),
            "tokens_per_s": round(self.tokens / dt, 1),
        }
