"""The opt-in torch.compile of the UNet's static blocks: a morph through compiled blocks gives
the eager morph's frames, and a second morph reuses the compiled graphs (no recompilation)."""

from __future__ import annotations

import pytest
import torch

from diffmorpher import MorphConfig
from diffmorpher.compile import compile_unet_blocks
from diffmorpher.pipeline import DiffMorpherPipeline
from tests.test_pipeline import FAST, _images, _prompts


def test_compiled_blocks_give_the_eager_frames_and_compile_once(tiny_sd_dir) -> None:
    pipe = DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu")
    config = MorphConfig(**FAST)
    eager = pipe(_images(), _prompts(), config)
    torch._dynamo.reset()
    compiled_modules = compile_unet_blocks(pipe.models.unet, backend="aot_eager")
    assert compiled_modules >= 4
    first = pipe(_images(), _prompts(), config)
    frames_compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    second = pipe(_images(), _prompts(), config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_compiled  # graphs reused
    assert (first.frame_tensors - eager.frame_tensors).abs().max() < 1e-3
    assert (second.frame_tensors - first.frame_tensors).abs().max() < 1e-6


def test_off_compiles_nothing_and_an_unknown_backend_is_refused(tiny_sd_dir) -> None:
    pipe = DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu")
    assert compile_unet_blocks(pipe.models.unet, backend="off") == 0
    with pytest.raises(ValueError, match="unknown torch.compile backend 'warp'"):
        compile_unet_blocks(pipe.models.unet, backend="warp")
