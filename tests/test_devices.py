"""Device and dtype selection, the worker's own GPU, stage-boundary synchronisation and free
memory, with the CUDA/MPS calls patched at the torch boundary (no accelerator here)."""

from __future__ import annotations

import pytest
import torch

from diffmorpher.config import ConfigError
from diffmorpher.devices import (
    default_dtype,
    free_memory_bytes,
    resolve_dtype,
    select_device,
    synchronize,
    use_device,
)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every CUDA/MPS call the code under test makes, recorded instead of run."""
    made: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: made.append(("cuda.synchronize", device)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: made.append(("cuda.set_device", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: made.append(("mps.synchronize",)))
    return made


def test_synchronize_waits_for_the_accelerator_and_does_nothing_on_the_cpu(calls: list[tuple]) -> None:
    synchronize(torch.device("cpu"))
    assert calls == []
    synchronize(torch.device("cuda", 1))
    synchronize(torch.device("mps"))
    assert calls == [("cuda.synchronize", torch.device("cuda", 1)), ("mps.synchronize",)]


def test_use_device_makes_the_workers_gpu_current_and_leaves_cpu_and_mps_alone(calls: list[tuple]) -> None:
    use_device(torch.device("cpu"))
    use_device(torch.device("mps"))
    assert calls == []
    use_device(torch.device("cuda", 3))
    assert calls == [("cuda.set_device", torch.device("cuda", 3))]


def test_the_best_device_is_the_current_cuda_device_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert select_device() == torch.device("cuda", 2)
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)], ids=["bf16", "no-bf16"])
def test_auto_precision_is_bf16_on_a_gpu_that_has_it_else_fp16(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert default_dtype(torch.device("cuda", 0)) == expected
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected


def test_auto_precision_is_fp32_on_the_cpu_and_fp16_on_mps() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # asked for: kept
    with pytest.raises(ConfigError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", torch.device("cpu"))


def test_free_memory_counts_the_allocators_unused_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * gib, 24 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    assert free_memory_bytes(torch.device("cuda", 0)) == 6 * gib  # 5 free + 1 reserved but unused
    assert free_memory_bytes(torch.device("cpu")) is None
    assert free_memory_bytes(torch.device("mps")) is None
