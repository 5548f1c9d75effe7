"""Batch planning: frame specs of a multi-image sequence and each row's weights, with numbers."""

from __future__ import annotations

import pytest
import torch

from diffmorpher.attention import MODE_OFF, MODE_REPLACE, MODE_STORE
from diffmorpher.batching import (
    RESERVE_BYTES,
    activation_bytes,
    decode_bytes,
    frame_batch_size,
    frame_specs,
    inversion_batches,
    sequence_batches,
)
from diffmorpher.config import DEFAULT_FRAME_BATCH, MorphConfig


def test_joints_appear_once_in_the_sequence() -> None:
    specs = frame_specs([[0.0, 0.5, 1.0], [0.0, 0.25, 1.0]])
    assert [(s.segment, s.alpha, s.index) for s in specs] == [
        (0, 0.0, 0), (0, 0.5, 1), (1, 0.0, 2), (1, 0.25, 3), (1, 1.0, 4),
    ]
    assert [s.endpoint for s in specs if not s.is_intermediate] == [0, 1, 2]


def test_endpoints_ride_in_the_first_batch_with_frames() -> None:
    specs = frame_specs([[0.0, 0.5, 1.0], [0.0, 0.25, 1.0]])
    batches = sequence_batches(specs, 3, MorphConfig(frame_batch_size=5))
    assert [(b.mode, b.images, [s.index for s in b.frames]) for b in batches] == [(MODE_REPLACE, [0, 1, 2], [1, 3])]
    (batch,) = batches
    assert batch.weights.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.75, 0.25]]
    assert batch.lora_weights.tolist() == [  # type: ignore[union-attr]
        [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0, 0.75, 0.25],
    ]
    small = sequence_batches(specs, 3, MorphConfig(frame_batch_size=2))
    assert [(b.mode, b.images, [s.index for s in b.frames]) for b in small] == [
        (MODE_STORE, [0, 1], []), (MODE_REPLACE, [2], [1]), (MODE_REPLACE, [], [3]),
    ]
    assert small[2].weights.tolist() == [[0.0, 0.75, 0.25]]


def test_fixed_lora_mode_gives_every_row_the_fixed_mix() -> None:
    specs = frame_specs([[0.0, 0.5, 1.0]])
    (batch,) = sequence_batches(specs, 2, MorphConfig(fixed_lora_alpha=0.2))
    assert torch.allclose(batch.lora_weights, torch.tensor([[0.8, 0.2]] * 3))  # type: ignore[arg-type]
    (inversion,) = inversion_batches([0, 1], 2, MorphConfig(fixed_lora_alpha=0.2))
    assert inversion.mode == MODE_OFF and inversion.images == [0, 1]
    assert torch.allclose(inversion.lora_weights, torch.tensor([[0.8, 0.2]] * 2))  # type: ignore[arg-type]
    (none,) = sequence_batches(specs, 2, MorphConfig(use_lora=False))
    assert none.lora_weights is None


def _rows(batches) -> list[tuple]:
    return [(b.mode, b.images, [s.index for s in b.frames], b.weights.tolist(),
             None if b.lora_weights is None else b.lora_weights.tolist()) for b in batches]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "no-lora"])
def test_a_split_batch_is_the_smaller_batches_the_plan_would_make(lora: bool) -> None:
    """The out-of-memory retry's halves: the same rows, modes, weights and LoRA mixes as
    planning the pass at the smaller size."""
    specs = frame_specs([[0.0, 0.5, 1.0], [0.0, 0.25, 0.6, 1.0]])
    (batch,) = sequence_batches(specs, 3, MorphConfig(frame_batch_size=6, use_lora=lora))
    assert batch.rows == 6
    for size in (1, 2, 3, 4):
        assert _rows(batch.split(size)) == _rows(sequence_batches(specs, 3, MorphConfig(frame_batch_size=size, use_lora=lora)))
    (inversion,) = inversion_batches([0, 1, 2], 3, MorphConfig())
    assert [(b.mode, b.images) for b in inversion.split(2)] == [(MODE_OFF, [0, 1]), (MODE_OFF, [2])]


GIB = 1 << 30
# SD 2.1-base at 512 px in bf16: 40 x 320 x 64^2 x 2 bytes a sample (0.105 GB); the reserve
# with one 4-image VAE slice: 1 GiB + 4 x 3 x 128 x 512^2 x 2 bytes (1.88 GB in all).
SD21_SAMPLE = activation_bytes(320, 64, 2)
SD21_RESERVE = RESERVE_BYTES + 4 * decode_bytes(128, 512, 2)


@pytest.mark.parametrize(
    "free, expected",
    [(20 * GIB, 16), (2.5e9, 4), (SD21_RESERVE + 8 * SD21_SAMPLE, 8), (SD21_RESERVE + 8 * SD21_SAMPLE - 1, 4),
     (SD21_RESERVE + SD21_SAMPLE // 2, 1), (GIB // 2, 1)],
    ids=["roomy", "2.5GB", "exactly-8", "just-under-8", "under-one", "less-than-reserve"],
)
def test_auto_frame_batch_is_the_largest_power_of_two_that_fits_free_memory(
    monkeypatch: pytest.MonkeyPatch, free: float, expected: int
) -> None:
    assert (SD21_SAMPLE, SD21_RESERVE) == (104_857_600, 1_879_048_192)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), 141 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert frame_batch_size(MorphConfig(), torch.device("cuda", 0), SD21_SAMPLE, SD21_RESERVE) == expected
    # A configured size is taken as it is, whatever the free memory.
    assert frame_batch_size(MorphConfig(frame_batch_size=32), torch.device("cuda", 0), SD21_SAMPLE, SD21_RESERVE) == 32


def test_auto_frame_batch_on_the_cpu_is_todays_default() -> None:
    assert MorphConfig().frame_batch_size == 0
    assert frame_batch_size(MorphConfig(), torch.device("cpu"), SD21_SAMPLE, SD21_RESERVE) == DEFAULT_FRAME_BATCH == 16
    # An unresolved config plans batches of the default size.
    specs = frame_specs([[i / 19 for i in range(20)]])
    assert [b.rows for b in sequence_batches(specs, 2, MorphConfig())] == [16, 4]
