"""checkpoints.detect: the shipped architectures recognised from keys and shapes alone (built on the
meta device: no memory), and every file the morph cannot serve refused with a message that names
what was found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from checkpoints.architectures import ARCHITECTURES
from checkpoints.components import canonical_state, components
from checkpoints.convert import convert_single_file
from checkpoints.detect import detect_architecture, open_checkpoint
from checkpoints.errors import CheckpointError
from checkpoints.keymap import from_original, to_original
from checkpoints.spec import for_architecture
from checkpoints.write_single_file import write_single_file
from tests.conftest import EMBEDDED_MODEL


def published_originals(name: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The architecture's diffusers models on the meta device (built here from the published configs,
    not through checkpoints.components) and their tensors under original names (the writer's table)."""
    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**arch.unet), "vae": AutoencoderKL(**arch.vae)}
        classes = (CLIPTextModel, CLIPTextModelWithProjection)
        for index, config in enumerate(arch.text_encoders):
            models["text_encoder" if index == 0 else "text_encoder_2"] = classes[index](CLIPTextConfig(**config))
    states = {part: canonical_state(model) for part, model in models.items()}
    original: dict[str, torch.Tensor] = {}
    for part in components(for_architecture(arch)):
        original.update(to_original(states[part.folder], part.where))
    return original, states


# Published original keys and shapes (facts of the released checkpoints' layout).
KNOWN = {
    "sd15": {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
             "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
             "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
             "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
             "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
             "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)},
    "sd21-base": {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
                  "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
                  "cond_stage_model.model.positional_embedding": (77, 1024),
                  "cond_stage_model.model.token_embedding.weight": (49408, 1024)},
    "sdxl-base": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                  "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
                  "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                  "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
                  "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
                  "conditioner.embedders.1.model.text_projection": (1280, 1280),
                  "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280)},
}
@pytest.mark.parametrize("name", ["sd15", "sd21-base", "sd21", "sdxl-base"])
def test_published_architectures_are_recognised_from_keys_and_shapes(name: str) -> None:
    original, states = published_originals(name)
    shapes = {key: tuple(tensor.shape) for key, tensor in original.items()}
    if name.startswith("sd21"):  # the prediction type is not in the weights: the option decides
        with pytest.raises(CheckpointError, match="--single-file-arch sd21-base .* or --single-file-arch sd21 "):
            detect_architecture(shapes)
        assert detect_architecture(shapes, name) == name
    else:
        assert detect_architecture(shapes) == name
    for key, shape in KNOWN.get(name, {}).items():
        assert shapes[key] == shape, key
    # Every original key maps back onto exactly the diffusers models' keys, with their shapes.
    spec = for_architecture(ARCHITECTURES[name])
    read: set[str] = set()
    for part in components(spec):
        back = from_original(original.__getitem__, part.where)
        assert {key: tuple(t.shape) for key, t in back.items()} == {k: tuple(t.shape) for k, t in states[part.folder].items()}
        read |= {placement.key for placement in part.where.values()}
    assert read == set(original)


def test_published_key_counts() -> None:
    sd15, _ = published_originals("sd15")
    assert len(sd15) == 686 + 248 + 196
    sd21, _ = published_originals("sd21-base")
    # OpenCLIP: 12 tensors a layer (in_proj, out_proj, ln_1, ln_2, c_fc, c_proj, each weight + bias)
    # where CLIP has 16 (q, k, v apart), plus token and positional embedding and ln_final.
    assert len(sd21) == 686 + 248 + 23 * 12 + 4
    sdxl, _ = published_originals("sdxl-base")
    assert len([key for key in sdxl if key.startswith("model.diffusion_model.")]) == 1680


def test_a_hub_file_with_extra_keys_is_still_recognised() -> None:
    """Hub SD 2.x files keep OpenCLIP's 24th layer, its projection and EMA weights: unused, not refused."""
    original, _ = published_originals("sd21-base")
    shapes = {key: tuple(tensor.shape) for key, tensor in original.items()}
    shapes |= {"cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
               "cond_stage_model.model.text_projection": (1024, 1024), "model_ema.decay": ()}
    assert detect_architecture(shapes, "sd21") == "sd21"


def test_a_mismatched_option_is_refused() -> None:
    original, _ = published_originals("sd15")
    shapes = {key: tuple(tensor.shape) for key, tensor in original.items()}
    with pytest.raises(CheckpointError, match="holds sd15 .* not the requested --single-file-arch sdxl-base"):
        detect_architecture(shapes, "sdxl-base")


# ------------------------------------------------------------------------------------ refusals
def tiny_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, path)
    return path


UNET_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768)}
REFUSED = {
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "is a LoRA file"),
    "peft-lora": ({"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": (4, 8)}, "is a LoRA file"),
    "sd3": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (24, 8)}, "is an SD3 .*transformer, not a UNet"),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": (24, 8)}, "is a Flux checkpoint"),
    "refiner": ({**UNET_KEYS, "conditioner.embedders.0.model.ln_final.weight": (1280,)}, "is an SDXL refiner"),
    "inpainting": ({**UNET_KEYS, "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3)},
                   "takes 9 input channels \\(an inpainting model\\)"),
    "vae-only": ({"first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)},
                 "has no UNet keys \\(model.diffusion_model.\\*\\); found 1 keys like first_stage_model"),
    "no-text": (UNET_KEYS, "has no text encoder"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_files_are_refused_by_name(tmp_path: Path, case: str) -> None:
    shapes, message = REFUSED[case]
    path = tiny_file(tmp_path / f"{case}.safetensors", shapes)
    with pytest.raises(CheckpointError, match=message) as refused:
        convert_single_file(path, tmp_path / "out")
    assert "supported: original (LDM) single files of SD 1.x (sd15), SD 2.x" in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"checkpoint file {tmp_path}/absent.safetensors does not exist"):
        convert_single_file(tmp_path / "absent.safetensors", tmp_path / "out")


def test_a_file_short_of_its_architecture_is_refused_naming_the_keys(tmp_path: Path) -> None:
    """Keys and widths of SD 1.5 (detected as sd15) but most tensors absent or of other shapes."""
    shapes = {**UNET_KEYS, "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}
    with pytest.raises(CheckpointError, match=r"odd.safetensors: its unet does not match the chosen architecture: "
                                              r"\d+ keys missing, e.g. .*; 2 shapes differ, e.g. "
                                              r"model.diffusion_model.input_blocks.0.0.weight \(8, 4, 3, 3\) "
                                              r"\(expected \(320, 4, 3, 3\)\)"):
        convert_single_file(tiny_file(tmp_path / "odd.safetensors", shapes), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickles_need_the_opt_in_and_then_take_the_same_path(tmp_path: Path) -> None:
    file = write_single_file(EMBEDDED_MODEL, tmp_path / "tiny.safetensors")
    checkpoint = open_checkpoint(file)
    pickle = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {key: checkpoint.get(key) for key in checkpoint.shapes}}, pickle)
    with pytest.raises(CheckpointError, match=r"is a pickle checkpoint \(\.ckpt\): loading it runs any code .*"
                                              r"--trust-pickle \(make export TRUST_PICKLE=1\)"):
        convert_single_file(pickle, tmp_path / "out")
    trusted = open_checkpoint(pickle, trust_pickle=True)
    assert trusted.shapes == checkpoint.shapes
    assert torch.equal(trusted.get("model.diffusion_model.out.2.weight"), checkpoint.get("model.diffusion_model.out.2.weight"))
    # A pickle carries no configs: matched by shapes, the tiny model is no published architecture.
    with pytest.raises(CheckpointError, match="cross-attention width 64 and a clip text encoder match no shipped"):
        convert_single_file(pickle, tmp_path / "out", trust_pickle=True)
