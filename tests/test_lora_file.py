"""Fitted LoRAs as diffusers LoRA files, and LoRAs sent instead of fitted (diffmorpher.lora_file):
the file loads with diffusers and means there what it means in the morph, sent back it gives the
fitted morph's frames bit for bit, and every bad file gets its own error naming the field."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image

from diffmorpher.config import ConfigError, MorphConfig
from diffmorpher.lora import lora_training
from diffmorpher.lora_file import (
    METADATA_KEY,
    check_lora_ranks,
    lora_module_shapes,
    lora_rank,
    lora_to_safetensors,
    read_lora,
)
from diffmorpher.lora_mix import build_lora_stacks
from diffmorpher.pipeline import DiffMorpherPipeline
from morph_protocol import limits
from tests.conftest import EMBEDDED_MODEL

FAST = dict(num_frames=5, lora_steps=3, lora_rank=4, num_inference_steps=4, perceptual_metric="pixel")


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu")


@pytest.fixture(scope="module")
def fitted(pipe):
    """A real morph with its fitted LoRAs (rank 4)."""
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    return images, pipe(images, ["a red square", "a blue square"], MorphConfig(**FAST))


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for module, (in_features, out_features) in shapes.items():
        lora[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        lora[f"{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
    return lora


def test_the_fitted_loras_modules_are_the_ones_a_sent_lora_may_hold(pipe, fitted) -> None:
    _, result = fitted
    shapes = lora_module_shapes(pipe.models.unet)
    modules = {key[: -len(".lora_A.weight")] for key in result.loras[0] if key.endswith(".lora_A.weight")}
    assert modules == set(shapes) and len(shapes) == 32  # 4 projections x 2 attentions x 4 transformer blocks
    assert lora_rank(result.loras[0]) == 4


def test_a_returned_lora_loads_with_diffusers_load_lora_weights(tiny_sd_dir, fitted, tmp_path) -> None:
    _, result = fitted
    (tmp_path / "lora_0.safetensors").write_bytes(lora_to_safetensors(result.loras[0]))
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    sd.load_lora_weights(str(tmp_path), weight_name="lora_0.safetensors", adapter_name="fitted")
    loaded = get_peft_model_state_dict(sd.unet, adapter_name="fitted")
    assert set(loaded) == set(result.loras[0])
    assert all(torch.equal(loaded[key], result.loras[0][key]) for key in loaded)
    config = sd.unet.peft_config["fitted"]
    assert (config.r, config.lora_alpha) == (4, 4)  # scaling 1, as fitted


def test_the_file_means_in_diffusers_what_it_means_in_the_morph(tmp_path) -> None:
    """On the embedded model: the UNet with the file loaded by diffusers predicts what the
    morph's UNet predicts with the same LoRA (row 0 through LoRA 0, lora.lora_training)."""
    if not (EMBEDDED_MODEL / "unet").is_dir():
        pytest.skip("the embedded model is not built")
    sd = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL)
    unet = sd.unet
    lora = random_lora(lora_module_shapes(unet), rank=16)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        plain = unet(latents, timestep, encoder_hidden_states=context).sample
        with lora_training(unet, build_lora_stacks([lora], torch.device("cpu"), torch.float32)):
            ours = unet(latents, timestep, encoder_hidden_states=context).sample
    data = lora_to_safetensors(lora)
    (tmp_path / "lora.safetensors").write_bytes(data)
    sd.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    with torch.no_grad():
        theirs = unet(latents, timestep, encoder_hidden_states=context).sample
    assert (ours - plain).abs().max() > 1e-2  # the LoRA changes the prediction
    assert (theirs - ours).abs().max() < 1e-5
    # The embedded model's rank-16 file (the size the docs quote).
    assert len(data) == pytest.approx(449_700, rel=0.01)


def test_sd15_rank16_file_size() -> None:
    """SD 1.5's 128 attention projections at rank 16, fp32: the size the docs quote."""
    dims = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3  # 16 blocks
    shapes = {}
    for block, dim in enumerate(dims):
        for attn, context in (("attn1", dim), ("attn2", 768)):
            for name, in_features in (("to_q", dim), ("to_k", context), ("to_v", context), ("to_out.0", dim)):
                shapes[f"b{block}.{attn}.{name}"] = (in_features, dim)
    size = len(lora_to_safetensors(random_lora(shapes, rank=16)))
    assert len(shapes) == 128 and size == pytest.approx(12.8e6, rel=0.01)
    assert size < limits.MAX_LORA_BYTES


def test_read_lora_returns_the_fitted_tensors_exactly(pipe, fitted) -> None:
    _, result = fitted
    back = read_lora(lora_to_safetensors(result.loras[1]), lora_module_shapes(pipe.models.unet), field="lora_1")
    assert set(back) == set(result.loras[1])
    assert all(torch.equal(back[key], result.loras[1][key]) for key in back)


def test_sent_loras_give_the_fitted_morphs_frames_bit_for_bit(pipe, fitted) -> None:
    images, first = fitted
    sent = [pipe.read_lora(lora_to_safetensors(lora), f"lora_{i}") for i, lora in enumerate(first.loras)]
    second = pipe(images, ["a red square", "a blue square"], MorphConfig(**FAST), loras=sent)
    assert torch.equal(first.frame_tensors, second.frame_tensors)
    assert first.alphas == second.alphas
    assert (first.work.lora_fits, second.work.lora_fits, second.work.lora_steps) == (2, 0, 0)


def test_one_sent_lora_and_one_fitted(pipe, fitted) -> None:
    images, first = fitted
    sent = [None, pipe.read_lora(lora_to_safetensors(first.loras[1]), "lora_1")]
    second = pipe(images, ["a red square", "a blue square"], MorphConfig(**FAST), loras=sent)
    # Image 0's LoRA is fitted alone here, with both images before: equal up to float rounding.
    assert (first.frame_tensors - second.frame_tensors).abs().max() < 5e-5  # measured 5.2e-6
    assert second.work.lora_fits == 1


def test_alpha_metadata_scales_the_up_matrices_and_missing_modules_are_zero(pipe) -> None:
    shapes = lora_module_shapes(pipe.models.unet)
    lora = random_lora(shapes, rank=2)
    module = sorted(shapes)[0]
    partial = {f"unet.{module}.lora_A.weight": lora[f"{module}.lora_A.weight"],
               f"unet.{module}.lora_B.weight": lora[f"{module}.lora_B.weight"]}
    metadata = {METADATA_KEY: json.dumps({"unet.r": 2, "unet.lora_alpha": 8})}
    back = read_lora(safetensors.torch.save(partial, metadata=metadata), shapes)
    assert torch.equal(back[f"{module}.lora_B.weight"], lora[f"{module}.lora_B.weight"] * 4.0)  # alpha / r
    assert torch.equal(back[f"{module}.lora_A.weight"], lora[f"{module}.lora_A.weight"])
    other = sorted(shapes)[1]
    assert back[f"{other}.lora_A.weight"].shape == (2, shapes[other][0])
    assert back[f"{other}.lora_B.weight"].abs().sum() == 0 and len(back) == 2 * len(shapes)
    # peft's own names (get_peft_model_state_dict, no unet. prefix), fp16, are read too
    half = safetensors.torch.save({key: tensor.half() for key, tensor in lora.items()})
    assert torch.equal(read_lora(half, shapes)[f"{module}.lora_A.weight"], lora[f"{module}.lora_A.weight"].half().float())


def _raw_safetensors(header: dict) -> bytes:
    """A file with a hand-written header (what safetensors' own writer would never make)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\0" * 16


def _bad_files(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[bytes, str]]:
    module = sorted(shapes)[0]
    in_features, out_features = shapes[module]
    good = {f"unet.{module}.lora_A.weight": torch.zeros(4, in_features),
            f"unet.{module}.lora_B.weight": torch.zeros(out_features, 4)}
    save = safetensors.torch.save
    return {
        "wrong shape": (save({**good, f"unet.{module}.lora_A.weight": torch.zeros(4, in_features + 1)}),
                        f"field 'lora_0' has 'unet.{module}.lora_A.weight' of shape [4, {in_features + 1}]; "
                        f"this model's {module} takes {in_features} features"),
        "wrong up shape": (save({**good, f"unet.{module}.lora_B.weight": torch.zeros(out_features, 3)}),
                           f"must be [{out_features}, 4]"),
        "unknown key": (save({**good, "unet.mid_block.resnets.0.conv1.lora_A.weight": torch.zeros(4, 4)}),
                        "field 'lora_0' has the unknown key 'unet.mid_block.resnets.0.conv1.lora_A.weight': "
                        "'mid_block.resnets.0.conv1' is not an attention projection of this model's UNet"),
        "not a lora key": (save({**good, f"unet.{module}.weight": torch.zeros(4, 4)}),
                           f"has the unknown key 'unet.{module}.weight': expected [unet.]<module>.lora_A.weight"),
        "text encoder": (save({**good, "text_encoder.text_model.q.lora_A.weight": torch.zeros(4, 4)}),
                         "has the text-encoder key"),
        "too high a rank": (save({f"unet.{module}.lora_A.weight": torch.zeros(limits.MAX_LORA_RANK + 1, in_features),
                                  f"unet.{module}.lora_B.weight": torch.zeros(out_features, limits.MAX_LORA_RANK + 1)}),
                            f"has rank {limits.MAX_LORA_RANK + 1} in"),
        "no up matrix": (save({f"unet.{module}.lora_A.weight": torch.zeros(4, in_features)}), "but no lora_B"),
        "integer weights": (save({**good, f"unet.{module}.lora_A.weight": torch.zeros(4, in_features, dtype=torch.int32)}),
                            "of dtype 'I32'"),
        "nan": (save({**good, f"unet.{module}.lora_B.weight": torch.full((out_features, 4), float("nan"))}),
                "NaN or infinite values"),
        "metadata rank": (save(good, metadata={METADATA_KEY: json.dumps({"unet.r": 8})}),
                          "says r=8 in its metadata but its matrices have rank 4"),
        "not safetensors": (b"PK\x03\x04 a zip file, not a LoRA", "field 'lora_0' is not a safetensors file (27 bytes"),
        "header past the end": (struct.pack("<Q", 10**6) + b"{}", "is not a safetensors file"),
        "shape of strings": (_raw_safetensors({"m.lora_A.weight": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}),
                             "entry 'm.lora_A.weight' has no dtype and shape"),
        "metadata not strings": (_raw_safetensors({"__metadata__": {"lora_adapter_metadata": {"r": 4}}}),
                                 "__metadata__ that is not an object of strings"),
        "empty": (b"", "field 'lora_0' is empty"),
        "too big": (b"\0" * (limits.MAX_LORA_BYTES + 1),
                    f"field 'lora_0' is {limits.MAX_LORA_BYTES + 1} bytes; a LoRA may have at most {limits.MAX_LORA_BYTES}"),
    }


@pytest.mark.parametrize("case", list(_bad_files({"m.to_q": (1, 1)})))
def test_each_bad_lora_gets_its_own_error_naming_the_field(pipe, case: str) -> None:
    data, message = _bad_files(lora_module_shapes(pipe.models.unet))[case]
    with pytest.raises(ConfigError) as raised:
        read_lora(data, lora_module_shapes(pipe.models.unet), field="lora_0")
    assert message in str(raised.value)
    assert raised.value.field == "lora_0"


def test_a_morphs_loras_share_one_rank(pipe, fitted) -> None:
    images, first = fitted
    rank2 = random_lora(lora_module_shapes(pipe.models.unet), rank=2)
    with pytest.raises(ConfigError, match="field 'lora_1' has rank 2; it must equal the morph's lora_rank 4") as raised:
        pipe(images, ["a", "b"], MorphConfig(**FAST), loras=[None, rank2])
    assert raised.value.field == "lora_1"
    check_lora_ranks([rank2, rank2], fitted_rank=None)  # all sent, one rank: the morph's lora_rank does not matter
    with pytest.raises(ConfigError, match="field 'lora_1' has rank 4; it must equal the rank 2 of the other LoRAs"):
        check_lora_ranks([rank2, first.loras[0]], fitted_rank=None)
    with pytest.raises(ConfigError, match="use_lora is false"):
        pipe(images, ["a", "b"], MorphConfig(**FAST, use_lora=False), loras=[rank2, None])
