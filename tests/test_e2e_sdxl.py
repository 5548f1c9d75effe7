"""End to end with SDXL: `python -m export` of the tiny SDXL folder (both text encoders and
tokenizers in the archive) -> a real TorchServe + guard -> one small morph through the gRPC
client. One server start; the morph is tiny (3 frames, 2 LoRA steps, 4 DDIM steps)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from launcher.archive import export_model
from tests.conftest import served_two_colour_morph

pytestmark = pytest.mark.slow

FRAMES = 3
TINY = {"num_frames": FRAMES, "lora_steps": 2, "num_inference_steps": 4, "use_reschedule": False, "seed": 5}


def test_an_sdxl_morph_through_torchserve(tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    store = export_model(tiny_sdxl_dir, tmp_path / "store", quiet=True)
    with zipfile.ZipFile(store / "diffmorpher.mar") as archive:
        names = archive.namelist()
    assert any(n.startswith("model/text_encoder_2/") for n in names)
    assert any(n.startswith("model/tokenizer_2/") for n in names)
    # 32 px: the tiny SDXL's native resolution
    result = served_two_colour_morph(store, tmp_path / "server", ["a red square", "a blue circle"], TINY, 32)
    gif = Image.open(io.BytesIO(result.part_for("gif").data))
    assert gif.n_frames == FRAMES
    assert result.metadata["num_frames"] == FRAMES and len(result.metadata["alphas"]) == FRAMES
    assert result.metadata["alphas"][0] == 0.0 and result.metadata["alphas"][-1] == 1.0
    assert result.metadata["seed"] == TINY["seed"] and result.metadata["resolution"] == 32
