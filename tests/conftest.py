"""Shared fixtures: the tiny random SD folder and the repository's paths."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from launcher.archive import export_model
from tests.tiny_sd import save_tiny_sd

# Two cores are shared by this process, TorchServe workers and Locust: more than one intra-op
# thread per process makes OpenMP barriers wait on descheduled threads, measured here as a 10x
# slowdown of small models. Override with TEST_TORCH_THREADS.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))



@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Code under test may set torch's thread count (the handler sets cores // workers at
    initialize): restore ours after each test, or every later in-process test inherits it (two
    threads beside another busy process measured 40x slower here)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO_ROOT / "models" / "tiny-shapes-sd"
DEMO_DIR = REPO_ROOT / "assets" / "demo"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def served_model(request: pytest.FixtureRequest) -> Path:
    """The embedded model, or the tiny random SD folder where it is absent."""
    return EMBEDDED_MODEL if (EMBEDDED_MODEL / "unet").is_dir() else request.getfixturevalue("tiny_sd_dir")


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The served model's archive in a model store shared by every end-to-end server of the
    session."""
    return export_model(served_model(request), tmp_path_factory.mktemp("model_store"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


def demo_inputs() -> tuple[list[bytes], list[str]]:
    """The demo pair when the embedded model landed, else two flat-colour squares."""
    prompts_file = DEMO_DIR / "prompts.json"
    if (EMBEDDED_MODEL / "unet").is_dir() and prompts_file.is_file():
        prompts = json.loads(prompts_file.read_text())  # {"red_circle.png": "a red circle ...", ...}
        names = ("red_circle.png", "blue_triangle.png")
        return [(DEMO_DIR / n).read_bytes() for n in names], [str(prompts[n]) for n in names]
    pngs = []
    for colour in ("red", "blue"):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs, ["a red square", "a blue square"]


def flat_png(colour: str, size: int) -> bytes:
    """A one-colour PNG upload."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def served_two_colour_morph(store: Path, workdir: Path, prompts: list[str], options: dict, size: int):
    """Serve `store` under a TorchServe of its own, morph a red and a blue square of `size` px
    through the project's client (GIF + PNG parts), and check the PNG frames are every frame, in
    order, at `size` px. Returns the client's result."""
    from client.morph_client import MorphClient
    from launcher.torchserve import TorchServeProcess
    from morph_protocol.keyfile import TokenSource

    with TorchServeProcess(workdir, store) as server:
        with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file)) as morph:
            result = morph.morph([flat_png("red", size), flat_png("blue", size)], prompts,
                                 {**options, "format": ["gif", "png"]}, deadline_s=300)
    pngs = [part for part in result.parts if part.mime == "image/png"]
    assert [part.name for part in pngs] == [f"frame_{i:03d}.png" for i in range(options["num_frames"])]
    assert Image.open(io.BytesIO(pngs[0].data)).size == (size, size)
    return result
