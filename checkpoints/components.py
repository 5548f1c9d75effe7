"""The diffusers components a ModelSpec describes, as key tables and as folders on disk.

Each component is built from its config on the meta device (no memory, no time) only to learn its
state-dict keys and shapes; `keymap.placements` then says where each key lives in the original
file. Writing a component is its config.json plus one safetensors file, the layout
`from_pretrained` reads, so the tensors saved are exactly the ones read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .architectures import TOKENIZER_DIR
from .keymap import UNET_PREFIX, VAE_PREFIX, Placement, placements, to_original
from .spec import ModelSpec

TEXT_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS = "diffusion_pytorch_model.safetensors", "model.safetensors"


def canonical_key(model_class: type, key: str) -> str:
    """A text encoder key with the `text_model.` level that the original checkpoints' CLIP-L and
    older saved folders use. transformers 5's CLIPTextModel drops that level from its state dict
    and its new files (CLIPTextModelWithProjection keeps it), so folders differ by when they were
    saved; the key table is written against this one form."""
    if model_class is CLIPTextModel and not key.startswith("text_model."):
        return f"text_model.{key}"
    return key


def canonical_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {canonical_key(type(module), key): tensor for key, tensor in module.state_dict().items()}


@dataclass(frozen=True)
class Component:
    """One part of the folder: its skeleton (meta tensors) and where its tensors sit in the file."""

    folder: str
    skeleton: torch.nn.Module
    where: dict[str, Placement]

    def original_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each original key of this component must have."""
        state = canonical_state(self.skeleton)
        return {key: tuple(tensor.shape) for key, tensor in to_original(state, self.where).items()}

    def save(self, out: Path, state: dict[str, torch.Tensor]) -> None:
        """config.json + weights (`state` keyed by canonical names), as from_pretrained reads them."""
        folder = out / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self.skeleton, CLIPTextModel | CLIPTextModelWithProjection):
            config = self.skeleton.config
            config.architectures = [type(self.skeleton).__name__]
            config.save_pretrained(folder)
            # under the installed transformers' own names, as its save_pretrained would write them
            native = {key: state[canonical_key(type(self.skeleton), key)] for key in self.skeleton.state_dict()}
            save_file(native, folder / TRANSFORMERS_WEIGHTS, metadata={"format": "pt"})
        else:
            self.skeleton.save_config(folder)
            save_file(state, folder / DIFFUSERS_WEIGHTS)


def components(spec: ModelSpec) -> list[Component]:
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(spec.unet)
        vae = AutoencoderKL.from_config(spec.vae)
        encoders = [TEXT_CLASSES[slot.model_class](CLIPTextConfig.from_dict(config))
                    for slot, config in zip(spec.slots(), spec.text_encoders, strict=True)]
    parts = [
        Component("unet", unet, placements("unet", unet.state_dict(), prefix=UNET_PREFIX, config=spec.unet)),
        Component("vae", vae, placements("vae", vae.state_dict(), prefix=VAE_PREFIX, config=spec.vae)),
    ]
    for slot, encoder in zip(spec.slots(), encoders, strict=True):
        parts.append(Component(slot.folder, encoder,
                               placements("text", canonical_state(encoder), prefix=slot.prefix, layout=slot.layout)))
    return parts


def write_configs(spec: ModelSpec, out: Path) -> None:
    """What carries no weights: model_index.json, the scheduler and the tokenizers (the shipped
    CLIP BPE, padding as each encoder was trained to)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(spec.model_index(), indent=2))
    scheduler = {key: value for key, value in spec.scheduler.items() if not key.startswith("_")}
    DDIMScheduler.from_config(scheduler).save_pretrained(out / "scheduler")
    for slot in spec.slots():
        CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=slot.pad_token).save_pretrained(out / slot.tokenizer)
