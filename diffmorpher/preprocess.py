"""Image preprocessing shared by LoRA fitting and inversion.

The authors' code resized shorter-side-to-512 for LoRA training but squashed to a square for
inversion, so the LoRA learned a different image than the one inverted. Here one function makes
the model-resolution square used by every stage.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import ConfigError


def to_model_square(image: Image.Image, resolution: int) -> Image.Image:
    """RGB, EXIF-rotated, transparent areas on white, centre-cropped square, resized."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    width, height = image.size
    if width < 1 or height < 1:
        raise ConfigError("image has no pixels")
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """(1, 3, R, R) float32 in [-1, 1], the VAE's input range."""
    square = to_model_square(image, resolution)
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round()
    return [Image.fromarray(frame.astype(np.uint8)) for frame in array]


def pil_to_unit_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [0, 1] (for perceptual distances of finished frames)."""
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
