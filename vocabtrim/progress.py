"""Progress of a long stage on stderr: a tqdm bar on a terminal, periodic lines anywhere else (a log file, CI).

A line reads ``calibrate: 4/10 shards (40%), 1,234 tokens/s, eta 1 min 5 s``. Lines come at most every
``VOCABTRIM_PROGRESS_SECONDS`` seconds (default 30), plus one when the stage ends.
"""

from __future__ import annotations

import os
import sys
import time


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("VOCABTRIM_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class Progress:
    """``update(n, tokens=t)`` as work finishes; ``close()`` at the end.

    total, initial: units of work (shards, rows) in all and already done before this run (resumed).
    tokens: when updates pass ``tokens``, lines give tokens/s instead of units/s.
    """

    def __init__(self, total: int, unit: str, desc: str, *, initial: int = 0, enabled: bool = True,
                 stream=None, interval: float | None = None, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.unit, self.desc = total, unit, desc
        self.done = initial
        self.initial = initial
        self.tokens = 0
        self.enabled = enabled
        self.clock = clock
        self.interval = _interval() if interval is None else interval
        self.start = self.last = clock()
        self.bar = None
        self._closed = False
        self._printed = initial  # `done` at the last line printed
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, tokens: int | None = None) -> None:
        self.done += n
        if tokens is not None:
            self.tokens += tokens
        if self.bar is not None:
            self.bar.update(n)
            if tokens is not None:
                self.bar.set_postfix(tok_s=f"{self.tokens / max(self.clock() - self.start, 1e-9):,.0f}", refresh=False)
        elif self.enabled and self.clock() - self.last >= self.interval:
            self._line()

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        text = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}s{pct}"
        if self.tokens:
            text += f", {self.tokens / elapsed:,.0f} tokens/s"
        else:
            text += f", {(self.done - self.initial) / elapsed:,.2f} {self.unit}s/s"
        counted = self.done - self.initial
        if 0 < counted and self.done < self.total:
            text += f", eta {_duration((self.total - self.done) * elapsed / counted)}"
        elif self.done >= self.total:
            text += f", done in {_duration(elapsed)}"
        return text

    def _line(self) -> None:
        self.last = self.clock()
        self._printed = self.done
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done != self._printed:
            self._line()
