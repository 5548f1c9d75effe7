"""End to end from one original single file: the embedded model written as `tiny.safetensors`
(checkpoints.write_single_file) -> `python -m export --model tiny.safetensors` (converted once,
offline) -> a real TorchServe + guard -> one small morph through the gRPC client. The export runs
with the hub off and every proxy pointing at a closed port, so any download would fail it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from checkpoints.write_single_file import write_single_file
from export.build_mar import main as export_main
from launcher.archive import export_model
from tests.conftest import EMBEDDED_MODEL, served_two_colour_morph

pytestmark = pytest.mark.slow

FRAMES = 3
TINY = {"num_frames": FRAMES, "lora_steps": 2, "num_inference_steps": 4, "use_reschedule": False, "seed": 5}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def single_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_file(EMBEDDED_MODEL, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def test_a_single_file_exports_serves_and_morphs(tmp_path: Path, single_file: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as offline:
        for key, value in OFFLINE.items():
            offline.setenv(key, value)
        store = export_model(single_file, tmp_path / "store", quiet=True)
    with zipfile.ZipFile(store / "diffmorpher.mar") as archive:
        names = set(archive.namelist())
        unet = archive.read("model/unet/diffusion_pytorch_model.safetensors")
    assert {"model/model_index.json", "model/text_encoder/model.safetensors", "model/tokenizer/tokenizer.json",
            "model/scheduler/scheduler_config.json", "model/vae/diffusion_pytorch_model.safetensors"} <= names
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(unet)
    shipped, embedded = (load_file(folder / "diffusion_pytorch_model.safetensors")
                         for folder in (tmp_path, EMBEDDED_MODEL / "unet"))
    assert shipped.keys() == embedded.keys() and all(torch.equal(shipped[k], embedded[k]) for k in embedded)
    # 64 px: the embedded model's resolution
    result = served_two_colour_morph(store, tmp_path / "server", ["a red circle", "a blue triangle"], TINY, 64)
    assert result.metadata["alphas"][0] == 0.0 and result.metadata["alphas"][-1] == 1.0


def test_external_weights_are_converted_beside_the_file_and_referenced(tmp_path: Path, single_file: Path) -> None:
    store = export_model(single_file, tmp_path / "store", "--weights", "external", "--archive-format", "no-archive",
                         quiet=True)
    converted = single_file.with_name("tiny-diffusers")
    config = yaml.safe_load((store / "diffmorpher" / "model-config.yaml").read_text())
    assert config["handler"]["model_dir"] == str(converted)
    assert (converted / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (store / "diffmorpher" / "model").exists()


def test_export_refuses_an_ambiguous_or_unsupported_file_with_its_message(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lora, sd2 = tmp_path / "style-lora.safetensors", tmp_path / "sd2.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024),
               "cond_stage_model.model.ln_final.weight": torch.zeros(1024)}, sd2)
    cases = ((lora, ("style-lora.safetensors is a LoRA file (1 LoRA keys",)),
             (tmp_path / "absent.safetensors", ("absent.safetensors does not exist",)),
             (sd2, ("sd2.safetensors is an SD 2.x checkpoint", "Pass --single-file-arch sd21-base (512 px, epsilon",
                    "or --single-file-arch sd21 (768 px, v-prediction", "SINGLE_FILE_ARCH=sd21-base")),
             (tmp_path / "model.ckpt", ("checkpoint file", "model.ckpt does not exist")))
    for model, messages in cases:
        caplog.clear()
        assert export_main(["--model", str(model), "--export-path", str(tmp_path / "store")]) == 1
        assert all(message in caplog.text for message in messages), caplog.text
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
