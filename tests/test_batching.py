"""Batch planning: frame specs of a multi-image sequence and each row's weights, with numbers."""

from __future__ import annotations

import torch

from diffmorpher.attention import MODE_OFF, MODE_REPLACE, MODE_STORE
from diffmorpher.batching import frame_specs, inversion_batches, sequence_batches
from diffmorpher.config import MorphConfig


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
