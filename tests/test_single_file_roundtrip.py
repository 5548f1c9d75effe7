"""checkpoints.write_single_file and checkpoints.convert: a diffusers folder -> one original-layout
file -> the export's conversion gives back the same tensors, bit for bit, and the same frames."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from checkpoints.convert import SOURCE_FILE, convert_single_file
from checkpoints.spec import METADATA_KEY
from checkpoints.write_single_file import write_single_file
from diffmorpher import MorphConfig
from diffmorpher.pipeline import DiffMorpherPipeline
from tests.conftest import EMBEDDED_MODEL

WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
FAST = dict(num_frames=3, lora_steps=2, lora_rank=4, num_inference_steps=3, perceptual_metric="pixel",
            use_reschedule=False, seed=3)


def saved_tensors(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """A part's saved tensors; a text encoder's without the `text_model.` level, which
    transformers 5 no longer writes for CLIPTextModel but older folders (the embedded model) have."""
    tensors = load_file(folder / part / WEIGHT_FILES[part])
    if part != "text_encoder":
        return tensors
    return {key.removeprefix("text_model."): tensor for key, tensor in tensors.items()}


def assert_same_tensors(original: Path, converted: Path, parts: tuple[str, ...]) -> int:
    """Every tensor of every part equal in name, dtype and value; returns how many."""
    count = 0
    for part in parts:
        before, after = saved_tensors(original, part), saved_tensors(converted, part)
        assert sorted(after) == sorted(before), part
        for key, tensor in before.items():
            assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), f"{part}: {key}"
        count += len(before)
    return count


def assert_same_tokenizers(original: Path, converted: Path, names: tuple[str, ...]) -> None:
    prompt = "a red circle on a blue square, photo"
    for name in names:
        before, after = CLIPTokenizer.from_pretrained(original / name), CLIPTokenizer.from_pretrained(converted / name)
        assert after.pad_token == before.pad_token, name
        padded = dict(padding="max_length", max_length=77, truncation=True)
        assert after(prompt, **padded).input_ids == before(prompt, **padded).input_ids, name


@pytest.fixture(scope="module")
def embedded_round_trip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("single-file")
    file = write_single_file(EMBEDDED_MODEL, folder / "tiny-shapes-sd.safetensors")
    return file, convert_single_file(file, folder / "converted")


def test_the_file_has_the_original_layout(embedded_round_trip: tuple[Path, Path]) -> None:
    file, _ = embedded_round_trip
    with safe_open(str(file), "pt") as handle:
        keys = set(handle.keys())
        assert METADATA_KEY in handle.metadata()
        attention_q = handle.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    # conv_in, the first down block's resnet and transformer, its downsampler; the up path's upsampler
    # after a resnet-only block (position 1) and after a transformer (position 2, layers_per_block=1).
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
            "model.diffusion_model.input_blocks.1.1.proj_in.weight", "model.diffusion_model.input_blocks.2.0.op.weight",
            "model.diffusion_model.output_blocks.1.1.conv.weight", "model.diffusion_model.output_blocks.3.2.conv.weight",
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.out.2.weight",
            "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.decoder.up.2.upsample.conv.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"} <= keys
    assert attention_q == [64, 64, 1, 1]  # the VAE's mid attention as 1x1 convolutions
    assert not any(key.startswith(("down_blocks", "model.diffusion_model.down_blocks")) for key in keys)


def test_embedded_model_round_trips_exactly(embedded_round_trip: tuple[Path, Path]) -> None:
    _, converted = embedded_round_trip
    assert assert_same_tensors(EMBEDDED_MODEL, converted, ("unet", "vae", "text_encoder")) == 531
    assert_same_tokenizers(EMBEDDED_MODEL, converted, ("tokenizer",))
    assert (converted / SOURCE_FILE).is_file()


def test_embedded_model_and_its_round_trip_morph_the_same(embedded_round_trip: tuple[Path, Path]) -> None:
    _, converted = embedded_round_trip
    images = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    prompts = ["a red square", "a blue square"]
    frames = [DiffMorpherPipeline.from_pretrained(folder, device="cpu")(images, prompts, MorphConfig(**FAST)).frame_tensors
              for folder in (EMBEDDED_MODEL, converted)]
    assert frames[0].shape == (3, 3, 64, 64)
    assert torch.equal(frames[0], frames[1])


def test_vae_attention_stored_as_linear_weights_reads_the_same(tmp_path: Path,
                                                                embedded_round_trip: tuple[Path, Path]) -> None:
    """Some re-saved original files hold the VAE attention's q/k/v/proj_out as 2-D weights."""
    file, converted = embedded_round_trip
    tensors = load_file(file)
    flattened = {key: tensor[:, :, 0, 0].contiguous() if ".attn_1." in key and tensor.ndim == 4 else tensor
                 for key, tensor in tensors.items()}
    assert sum(tensor.ndim == 2 for key, tensor in flattened.items() if ".attn_1." in key) == 8  # encoder + decoder
    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    save_file(flattened, tmp_path / "linear.safetensors", metadata=metadata)
    again = convert_single_file(tmp_path / "linear.safetensors", tmp_path / "converted")
    assert assert_same_tensors(converted, again, ("vae",)) == len(load_file(converted / "vae" / WEIGHT_FILES["vae"]))


def test_reconversion_is_skipped_only_for_the_same_file(tmp_path: Path, embedded_round_trip: tuple[Path, Path]) -> None:
    file, _ = embedded_round_trip
    out = convert_single_file(file, tmp_path / "kept", reuse=True)
    weights = out / "unet" / WEIGHT_FILES["unet"]
    first = weights.stat().st_mtime_ns
    assert convert_single_file(file, out, reuse=True) == out and weights.stat().st_mtime_ns == first
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(file.read_bytes())
    convert_single_file(copy, out, reuse=True)  # another file: converted again
    assert weights.stat().st_mtime_ns != first


def test_tiny_sdxl_round_trips_exactly(tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    file = write_single_file(tiny_sdxl_dir, tmp_path / "sdxl.safetensors")
    with safe_open(str(file), "pt") as handle:
        keys = set(handle.keys())
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    converted = convert_single_file(file, tmp_path / "converted")
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    assert assert_same_tensors(tiny_sdxl_dir, converted, parts) > 400
    assert_same_tokenizers(tiny_sdxl_dir, converted, ("tokenizer", "tokenizer_2"))
    assert CLIPTokenizer.from_pretrained(converted / "tokenizer_2").pad_token == "!"


def test_sd2_openclip_text_encoder_layout_round_trips(tmp_path: Path) -> None:
    """The embedded model's text encoder written as SD 2.x's OpenCLIP (fused q/k/v) and read back."""
    file = write_single_file(EMBEDDED_MODEL, tmp_path / "openclip.safetensors", text_layout="openclip")
    with safe_open(str(file), "pt") as handle:
        text = {key: handle.get_slice(key).get_shape() for key in handle.keys() if key.startswith("cond_stage_model.")}
        fused = handle.get_tensor("cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight")
    prefix = "cond_stage_model.model."
    assert text[prefix + "transformer.resblocks.0.attn.in_proj_weight"] == [192, 64]  # q, k, v stacked
    assert text[prefix + "transformer.resblocks.0.attn.in_proj_bias"] == [192]
    assert text[prefix + "positional_embedding"] == [77, 64]
    assert {prefix + name for name in ("token_embedding.weight", "ln_final.weight", "transformer.resblocks.1.ln_1.bias",
                                       "transformer.resblocks.1.ln_2.weight", "transformer.resblocks.1.mlp.c_fc.weight",
                                       "transformer.resblocks.1.mlp.c_proj.bias",
                                       "transformer.resblocks.1.attn.out_proj.weight")} <= set(text)
    assert not any("q_proj" in key or "text_model" in key for key in text)
    encoder = saved_tensors(EMBEDDED_MODEL, "text_encoder")
    layer = "encoder.layers.1.self_attn."
    assert torch.equal(fused[64:128], encoder[layer + "k_proj.weight"])  # the order is q, k, v
    converted = convert_single_file(file, tmp_path / "converted")
    assert assert_same_tensors(EMBEDDED_MODEL, converted, ("text_encoder",)) == len(encoder)


def test_files_written_here_read_the_same_with_diffusers_own_single_file_reader(
    tmp_path: Path, tiny_sdxl_dir: Path
) -> None:
    """An independent check of the key table: diffusers' `from_single_file` (its own conversion
    code, what users load hub files with) reads our SDXL file - the UNet with its added
    conditioning, the VAE's conv attention, CLIP-L and OpenCLIP bigG with its projection - back
    to the same tensors, offline, from the folder's configs."""
    from diffusers import StableDiffusionXLPipeline

    file = write_single_file(tiny_sdxl_dir, tmp_path / "sdxl.safetensors")
    read = StableDiffusionXLPipeline.from_single_file(str(file), config=str(tiny_sdxl_dir), local_files_only=True)
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    compared = 0
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(reference, part).state_dict(), getattr(read, part).state_dict()
        assert sorted(theirs) == sorted(ours), part
        different = [key for key, tensor in ours.items() if not torch.equal(theirs[key].to(tensor.dtype), tensor)]
        assert different == [], f"{part}: {different[:5]}"
        compared += len(ours)
    assert compared > 500
