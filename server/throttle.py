"""A warning that comes in bursts (junk from a client, say): the first is logged at once, then at most
one line per interval, carrying the count of those held back in between."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class ThrottledWarning:
    """Call it like `logger.warning(msg, *args, extra=..., exc_info=...)` (it logs at `level`, WARNING
    unless told). Within `interval_s` of a logged line, calls are only counted; the next line after
    the interval says how many were suppressed. Returns whether it logged.
    Anyone can send junk: one line per interval keeps the log readable and cheap whatever they send."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.level = level
        self.interval_s = interval_s
        self.clock = clock
        self.suppressed = 0
        self._last: float | None = None

    def __call__(self, msg: str, *args: object, **kwargs: Any) -> bool:
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_s:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg += " (%d more like it suppressed in the last %.0f s)"
            args = (*args, self.suppressed, now - (now if self._last is None else self._last))  # (a clock may start at 0)
        self.logger.log(self.level, msg, *args, **kwargs)
        self._last, self.suppressed = now, 0
        return True
