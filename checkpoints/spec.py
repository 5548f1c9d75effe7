"""What a single file becomes: the diffusers components' configs and where each sits in the file.

A file the project wrote carries its `ModelSpec` in the safetensors header metadata (str -> str,
one JSON value under `METADATA_KEY`), so any size, the tiny embedded model included, round-trips
exactly. A file from a hub carries none: `for_architecture` gives the spec of a shipped published
architecture (`checkpoints.architectures`), chosen by `checkpoints.detect`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from .architectures import CLIP_PAD_TOKEN, OPENCLIP_PAD_TOKEN, Architecture
from .keymap import CLIP, OPENCLIP, SD_TEXT_PREFIXES, SDXL_TEXT_PREFIXES

METADATA_KEY = "diffmorpher.single_file"
SD, SDXL = "sd", "sdxl"
SCHEDULER_CLASS = "DDIMScheduler"


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder: its transformers class, file prefix and layout, and its tokenizer's pad."""

    folder: str  # text_encoder / text_encoder_2
    tokenizer: str  # tokenizer / tokenizer_2
    model_class: str  # CLIPTextModel / CLIPTextModelWithProjection
    prefix: str
    layout: str
    pad_token: str


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "sd" (SD 1.x/2.x) or "sdxl" (SDXL base)
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # transformers CLIPTextConfig fields, one per encoder
    text_layout: str = CLIP  # SD only: how its one encoder is stored (SDXL: CLIP then OpenCLIP)
    pad_tokens: tuple[str, ...] = (CLIP_PAD_TOKEN,)

    @property
    def pipeline_class(self) -> str:
        return "StableDiffusionXLPipeline" if self.family == SDXL else "StableDiffusionPipeline"

    def slots(self) -> tuple[TextEncoderSlot, ...]:
        if self.family == SDXL:
            return (
                TextEncoderSlot("text_encoder", "tokenizer", "CLIPTextModel", SDXL_TEXT_PREFIXES[0], CLIP,
                                self.pad_tokens[0]),
                TextEncoderSlot("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection",
                                SDXL_TEXT_PREFIXES[1], OPENCLIP, self.pad_tokens[1]),
            )
        return (TextEncoderSlot("text_encoder", "tokenizer", "CLIPTextModel", SD_TEXT_PREFIXES[self.text_layout],
                                self.text_layout, self.pad_tokens[0]),)

    def model_index(self) -> dict[str, Any]:
        index: dict[str, Any] = {"_class_name": self.pipeline_class,
                                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
        for slot in self.slots():
            index[slot.folder] = ["transformers", slot.model_class]
            index[slot.tokenizer] = ["transformers", "CLIPTokenizer"]
        index["scheduler"] = ["diffusers", self.scheduler.get("_class_name", SCHEDULER_CLASS)]
        return index

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> ModelSpec | None:
        """The spec a project-written file carries, or None for a file without one."""
        if not metadata or METADATA_KEY not in metadata:
            return None
        fields = json.loads(metadata[METADATA_KEY])
        return cls(**{**fields, "text_encoders": tuple(fields["text_encoders"]),
                      "pad_tokens": tuple(fields["pad_tokens"])})


def for_architecture(arch: Architecture) -> ModelSpec:
    """The spec of a shipped published architecture (a hub file's weights carry no configs)."""
    if arch.is_sdxl:
        return ModelSpec(SDXL, dict(arch.unet), dict(arch.vae), {"_class_name": SCHEDULER_CLASS, **arch.scheduler},
                         tuple(dict(encoder) for encoder in arch.text_encoders), CLIP,
                         (CLIP_PAD_TOKEN, OPENCLIP_PAD_TOKEN))
    pad = OPENCLIP_PAD_TOKEN if arch.text_layout == OPENCLIP else CLIP_PAD_TOKEN
    return ModelSpec(SD, dict(arch.unet), dict(arch.vae), {"_class_name": SCHEDULER_CLASS, **arch.scheduler},
                     tuple(dict(encoder) for encoder in arch.text_encoders), arch.text_layout, (pad,))

