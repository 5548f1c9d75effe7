"""The peak resident memory of one block of code, not the process's high-water mark so far.

`make bench` runs its modes one after another in one process. The kernel's VmHWM, or RSS
sampled from the block's start, only ever grows over such a run, so a later mode would show the
peak of an earlier one. On Linux the kernel's high-water mark is reset at the block's start
(writing "5" to /proc/self/clear_refs sets VmHWM to the current RSS) and read at its end, which
catches every spike, however short. Elsewhere, or where clear_refs cannot be written, RSS is
sampled every 20 ms from the block's start instead.

Either way the peak includes what the process already held when the block began (`start`:
loaded weights, live objects); `peak - start` is what the block itself added. Before `start` is
read, garbage is collected and glibc is asked to return freed heap memory to the kernel
(malloc_trim), so that memory an earlier block freed but the allocator kept counts as little as
it can.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from pathlib import Path

import psutil

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
RESET_HIGH_WATER_MARK = "5"  # proc(5), /proc/pid/clear_refs: "reset the peak resident set size"


def status_bytes(field: str, status: Path = STATUS) -> int:
    """A memory field of /proc/self/status ("VmHWM", "VmRSS"), in bytes."""
    for line in status.read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            number, unit = value.split()
            assert unit == "kB", line
            return int(number) * 1024
    raise KeyError(f"{field} not in {status}")


def reset_high_water_mark() -> bool:
    """Sets the kernel's VmHWM to the current RSS; False where that is not possible."""
    try:
        CLEAR_REFS.write_text(RESET_HIGH_WATER_MARK)
        return "VmHWM" in STATUS.read_text()
    except OSError:
        return False


def release_freed_memory() -> None:
    """Collects garbage and returns glibc's free heap pages to the kernel (nothing elsewhere)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """`with PeakMemory() as memory:` ... then `memory.peak` and `memory.start` (bytes) and
    `memory.method` ("kernel": VmHWM reset and read; "sampled": RSS every 20 ms)."""

    def __init__(self, use_kernel: bool = True, interval_s: float = 0.02) -> None:
        self.process = psutil.Process()
        self.use_kernel = use_kernel
        self.interval_s = interval_s
        self.method = ""
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        release_freed_memory()
        self.start = self.process.memory_info().rss
        self.peak = self.start
        if self.use_kernel and reset_high_water_mark():
            self.method = "kernel"
        else:
            self.method = "sampled"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)
        else:
            self.peak = max(self.start, status_bytes("VmHWM"))
