"""Peak resident memory of a block of code, sampled in a thread, with an optional cap that stops the block."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import threading
from typing import Any


def rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``; ``None`` elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryCapExceeded(RuntimeError):
    """The process RSS went above the cap while a :class:`PeakRSS` block ran: the block was stopped."""


class PeakRSS:
    """Peak resident memory above the level at entry (``peak_mb``), sampled every ``interval`` seconds.

    ``trim=True`` first returns freed memory to the OS (``gc`` + glibc ``malloc_trim``), so the level at entry is
    not inflated by an earlier phase. With ``cap_bytes`` the first sample above the cap stops the block by raising
    :class:`MemoryCapExceeded` in the main thread (a simulated ``SIGINT`` whose handler this class installs for
    the block's duration), so one computation that runs away cannot take a shared machine's memory with it. The
    exit checks the cap once more, so a block shorter than one sampling interval is judged the same way, and a
    sample that trips just as the block ends raises the same error inside ``__exit__``, never a stray
    ``KeyboardInterrupt`` later. A real Ctrl-C still raises ``KeyboardInterrupt``. The cap needs the main thread
    (signal handlers live there); elsewhere it is an error.
    """

    def __init__(self, interval: float = 0.02, cap_bytes: int | None = None, *, trim: bool = False) -> None:
        self.interval = interval
        self.cap = cap_bytes
        self.trim = trim
        self.peak_mb: float | None = None
        self.tripped = False
        self._peak = 0
        self._stop = threading.Event()

    def _over(self, now: int | None) -> bool:
        return self.cap is not None and now is not None and now > self.cap

    def _sample(self) -> None:
        import _thread

        while not self._stop.is_set():
            now = rss_bytes()
            if now is not None:
                self._peak = max(self._peak, now)
                if self._over(now) and not self.tripped:
                    self.tripped = True
                    _thread.interrupt_main(signal.SIGINT)
            self._stop.wait(self.interval)

    def _error(self) -> MemoryCapExceeded:
        cap = (self.cap or 0) / 2**30
        return MemoryCapExceeded(
            f"resident memory above the cap of {cap:.2f} GiB (peak {self._peak / 2**30:.2f} GiB); stopped"
        )

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.tripped and self._armed:
            self._armed = False  # (one error per block)
            raise self._error()
        if not self.tripped:  # a real Ctrl-C
            handler = self._old_handler
            if callable(handler):
                handler(signum, frame)
            else:
                raise KeyboardInterrupt
        # tripped but disarmed: the error was raised already; the simulated signal is swallowed

    def __enter__(self) -> PeakRSS:
        if self.trim:
            gc.collect()
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
        self._base = rss_bytes()
        self._peak = self._base or 0
        self._armed = False
        if self.cap is not None:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("PeakRSS(cap_bytes=...) must run in the main thread (it stops it by a signal)")
            self._old_handler = signal.signal(signal.SIGINT, self._on_sigint)
            self._armed = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        try:
            if self._base is not None:
                self._thread.start()  # (its first sample may trip before this returns: the error is raised here)
        except BaseException:
            self._stop.set()
            self._armed = False
            if self._thread.is_alive():
                self._thread.join()
            if self.cap is not None:
                signal.signal(signal.SIGINT, self._old_handler)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            self._stop.set()
            if self._base is not None:
                self._thread.join()
                now = rss_bytes() or 0
                self._peak = max(self._peak, now)
                self.peak_mb = round((self._peak - self._base) / 2**20, 1)
                if self._over(self._peak) and not self.tripped:
                    self.tripped = True  # (over the cap between samples or before the first one)
        finally:
            armed, self._armed = self._armed, False
            if self.cap is not None:
                signal.signal(signal.SIGINT, self._old_handler)
        if self.tripped and armed and not isinstance(exc, MemoryCapExceeded):
            raise self._error() from exc
        return False
