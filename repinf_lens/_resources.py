"""Wall time and peak resident memory (RSS) per stage of a long job (the demo, benchmarks).

On Linux the kernel's high-water mark ``VmHWM`` is reset at the start of each stage (``/proc/self/clear_refs``,
value 5) and read at its end, so every stage reports its OWN peak, not the process's peak so far. Where that
is not possible (another OS, a locked-down ``/proc``), a background thread samples the RSS every 20 ms instead
(``"method": "sampled"``; a peak shorter than one sample can be missed).
"""

from __future__ import annotations

import contextlib
import re
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["StageMeter", "current_rss_mb", "peak_rss_mb"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return None if m is None else int(m.group(1)) / 1024


def current_rss_mb() -> float | None:
    """This process's resident memory now, in MiB (``None`` where ``/proc`` is unavailable)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory since start (or since the last reset), in MiB."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class StageMeter:
    """Measures each ``with meter.stage(name):`` block: ``seconds`` and ``peak_rss_mb`` (the stage's own peak).

    ``meter.stages`` is ``{name: {"seconds", "peak_rss_mb", "method"}}``; ``meter.peak_rss_mb`` the largest.
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        exact = _reset_peak()
        peak = [current_rss_mb() or 0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], current_rss_mb() or 0.0)

        thread = None if exact else threading.Thread(target=sample, daemon=True)
        if thread is not None:
            thread.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            stop.set()
            if thread is not None:
                thread.join()
            mb = peak_rss_mb() if exact else max(peak[0], current_rss_mb() or 0.0)
            self.stages[name] = {
                "seconds": round(seconds, 1),
                "peak_rss_mb": round(mb),
                "method": "VmHWM" if exact else "sampled",
            }

    @property
    def peak_rss_mb(self) -> float:
        """The largest per-stage peak so far (MiB)."""
        return max((s["peak_rss_mb"] for s in self.stages.values()), default=0.0)

    def rows(self) -> list[dict[str, Any]]:
        """One table row per stage: ``stage, seconds, peak RSS (MB)``."""
        return [
            {"stage": k, "seconds": v["seconds"], "peak RSS (MB)": v["peak_rss_mb"]} for k, v in self.stages.items()
        ]
