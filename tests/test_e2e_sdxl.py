"""End to end with SDXL: `python -m export` of the tiny SDXL folder (both text encoders and
tokenizers in the archive) -> a real TorchServe + guard -> one small morph through the gRPC
client. One server start; the morph is tiny (3 frames, 2 LoRA steps, 4 DDIM steps)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from client.morph_client import MorphClient
from launcher.archive import export_model
from launcher.torchserve import TorchServeProcess
from morph_protocol.keyfile import TokenSource

pytestmark = pytest.mark.slow

FRAMES = 3
TINY = {"num_frames": FRAMES, "lora_steps": 2, "num_inference_steps": 4, "use_reschedule": False, "seed": 5}


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_sdxl_morph_through_torchserve(tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    store = export_model(tiny_sdxl_dir, tmp_path / "store", quiet=True)
    with zipfile.ZipFile(store / "diffmorpher.mar") as archive:
        names = archive.namelist()
    assert any(n.startswith("model/text_encoder_2/") for n in names)
    assert any(n.startswith("model/tokenizer_2/") for n in names)
    with TorchServeProcess(tmp_path / "server", store) as server:
        with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file)) as morph:
            result = morph.morph([_png("red"), _png("blue")], ["a red square", "a blue circle"],
                                 {**TINY, "format": ["gif", "png"]}, deadline_s=300)
    pngs = [p for p in result.parts if p.mime == "image/png"]
    assert [p.name for p in pngs] == [f"frame_{i:03d}.png" for i in range(FRAMES)]
    assert Image.open(io.BytesIO(pngs[0].data)).size == (32, 32)  # the tiny SDXL's native resolution
    gif = Image.open(io.BytesIO(result.part_for("gif").data))
    assert gif.n_frames == FRAMES
    assert result.metadata["num_frames"] == FRAMES and len(result.metadata["alphas"]) == FRAMES
    assert result.metadata["alphas"][0] == 0.0 and result.metadata["alphas"][-1] == 1.0
    assert result.metadata["seed"] == TINY["seed"] and result.metadata["resolution"] == 32
