"""A random-weight diffusers folder of a real architecture (checkpoints/architectures.py).

    python -m benchmarks.sized_model --arch sd21-base --out .cache/sized-models/sd21-base

The folder has the real checkpoint's layout, component classes, configs and parameter counts,
saved in float16 as the published weights are (SD 2.1-base: 2.5 GB), and the real CLIP BPE
tokenizer (the embedded model's, `models/tiny-shapes-sd/tokenizer`). Served, it costs exactly
what the real model costs in memory, load time and time per UNet call; only the pictures are
noise. SDXL folders come out only as far as the core supports SDXL.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from checkpoints.architectures import ARCHITECTURES, TOKENIZER_DIR, Architecture

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPLETE = ".complete"  # written last: a folder without it is a half-written one


def write_random_model(arch: Architecture, out: Path, *, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Build every component from its config with random weights and save the folder. Reuses
    a complete folder of the same architecture (building SD takes a minute, SDXL several)."""
    marker = out / COMPLETE
    if marker.is_file() and marker.read_text() == arch.name:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    components: dict[str, list[str]] = {}

    def save(name: str, module: torch.nn.Module, library: str) -> None:
        module.to(dtype).save_pretrained(out / name, safe_serialization=True)
        components[name] = [library, type(module).__name__]
        del module

    save("unet", UNet2DConditionModel(**arch.unet), "diffusers")
    save("vae", AutoencoderKL(**arch.vae), "diffusers")
    encoders = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    for index, (encoder_config, (encoder_name, tokenizer_name)) in enumerate(zip(arch.text_encoders, encoders)):
        # SDXL's second encoder is the one with the projection that gives the pooled embedding.
        model_class = CLIPTextModelWithProjection if index == 1 else CLIPTextModel
        save(encoder_name, model_class(CLIPTextConfig(**encoder_config)), "transformers")
        shutil.copytree(TOKENIZER_DIR, out / tokenizer_name)
        components[tokenizer_name] = ["transformers", "CLIPTokenizer"]
    DDIMScheduler(**arch.scheduler).save_pretrained(out / "scheduler")
    components["scheduler"] = ["diffusers", "DDIMScheduler"]
    pipeline = "StableDiffusionXLPipeline" if arch.is_sdxl else "StableDiffusionPipeline"
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", **components}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    marker.write_text(arch.name)
    return out


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sized_model", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), required=True)
    parser.add_argument("--out", type=Path, help="default: .cache/sized-models/<arch>")
    args = parser.parse_args(argv)
    out = args.out or REPO_ROOT / ".cache" / "sized-models" / args.arch
    started = time.perf_counter()
    write_random_model(ARCHITECTURES[args.arch], out)
    print(f"wrote {out} ({folder_bytes(out) / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
