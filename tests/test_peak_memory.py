"""benchmarks/peak_memory.py: a block's own peak RSS. A block that touches 256 MiB and frees it,
then one that allocates nothing, in one process: the second block's peak is its own (lower by
about the 256 MiB), where the process-wide high-water mark would repeat the first's."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.peak_memory import PeakMemory, status_bytes

MIB = 2**20
BIG = 256 * MIB


def touch_and_free(nbytes: int, hold_s: float = 0.0) -> None:
    """Allocates `nbytes`, writes every page (so it is resident), holds it, frees it (a block
    this large is mmap'd by the allocator, so freeing it returns it to the kernel)."""
    block = torch.ones(nbytes, dtype=torch.uint8)
    time.sleep(hold_s)
    del block


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's high-water mark is Linux's")
def test_each_block_reports_its_own_peak_not_the_processs_high_water_mark() -> None:
    with PeakMemory() as big:
        touch_and_free(BIG)
    with PeakMemory() as small:
        touch_and_free(MIB)
    assert big.method == small.method == "kernel"
    assert big.peak - big.start >= BIG - 8 * MIB, (big.start / MIB, big.peak / MIB)
    assert small.peak - small.start < 32 * MIB, (small.start / MIB, small.peak / MIB)
    assert small.peak < big.peak - 200 * MIB
    # What the column showed before: the process-wide mark, which still holds the first peak
    # when nothing resets it.
    assert status_bytes("VmHWM") < big.peak - 200 * MIB  # reset by the second block
    with PeakMemory(use_kernel=False):
        pass
    touch_and_free(BIG)
    assert status_bytes("VmHWM") >= big.peak - 8 * MIB  # not reset: the mark kept the spike


def test_sampling_without_the_kernels_mark_also_reports_each_blocks_own_peak() -> None:
    """The fallback (other systems, or clear_refs not writable): RSS every 20 ms from the
    block's start, so a block held for 0.2 s is seen."""
    with PeakMemory(use_kernel=False) as big:
        touch_and_free(BIG, hold_s=0.2)
    with PeakMemory(use_kernel=False) as small:
        time.sleep(0.1)
    assert big.method == small.method == "sampled"
    assert big.peak - big.start >= BIG - 8 * MIB
    assert small.peak < big.peak - 200 * MIB


def test_status_fields_are_read_in_bytes(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  2080 kB\nVmRSS:\t    1000 kB\n")
    assert status_bytes("VmHWM", status) == 2080 * 1024
    assert status_bytes("VmRSS", status) == 1000 * 1024
    with pytest.raises(KeyError):
        status_bytes("VmPeak", status)
