"""Polling for the service tests: wait until a condition holds, or fail naming what was awaited."""
from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(cond: Callable[[], object], timeout: float = 60.0, what: str = "", every: float = 0.1,
               retry_on: tuple[type[BaseException], ...] = ()) -> float:
    """Poll ``cond`` until it is true and return the seconds it took; an exception in ``retry_on``
    counts as "not yet" (e.g. a Ray actor that is restarting). AssertionError after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if cond():
                return time.monotonic() - t0
        except retry_on:
            pass
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
