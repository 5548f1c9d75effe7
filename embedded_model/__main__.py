"""Train the project's embedded text-to-image model, or write the demo inputs.

    python -m embedded_model train --out models/tiny-shapes-sd      # what `make train-model` runs
    python -m embedded_model demo-assets --out assets/demo          # the two demo input images
    python -m embedded_model tokenizer --out DIR                    # only the CLIP tokenizer

`train` runs everything on CPU with a fixed seed: build the tokenizer (downloads the
open_clip_torch wheel into .cache/ once, for its BPE file), generate the shapes dataset, train
the VAE, precompute latents, train the UNet + text encoder, refine the VAE decoder alone, save
a StableDiffusionPipeline folder, evaluate it (VAE PSNR, held-out prompts with and without
guidance) and write the model card. The committed weights took 55 min with the default
--threads 2 on 2 idle cores; use --threads 1 when other jobs share the cores (more than one
thread per process is up to 6x *slower* then, measured here).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from . import dataset
from .architecture import make_scheduler
from .export import WEIGHTS_DTYPE, save_pipeline
from .model_card import write_model_card
from .tokenizer import build_tokenizer
from .train_unet import BlendBatch, train_unet
from .train_vae import (
    ColourLerpData, encode_latents, refine_decoder, round_trip_psnr, train_vae,
)

PSNR_IMAGES = 256
EVAL_SEED = 1234


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    started = time.perf_counter()
    tokenizer = build_tokenizer(out / "tokenizer")

    t = time.perf_counter()
    images, captions = dataset.generate(args.seed, args.images)
    log(f"dataset: {len(images)} images in {time.perf_counter() - t:.0f}s")

    colour_lerp, colour_lerp_stats = _colour_lerp(args, log)
    vae_result = train_vae(images, args.vae_steps, batch_size=args.vae_batch, seed=args.seed,
                           log=log, colour_lerp=colour_lerp)
    test_images, _ = dataset.generate(args.seed + 1, PSNR_IMAGES)
    vae_psnr = round_trip_psnr(vae_result.vae, test_images)
    log(f"vae: final mse {vae_result.final_loss:.5f}, round-trip PSNR {vae_psnr:.2f} dB")
    log(f"vae: decoded lerp of the demo's two latents, hues {_demo_lerp_hues(vae_result.vae)}")

    t = time.perf_counter()
    latents = encode_latents(vae_result.vae, images)
    scaling_factor = float(1.0 / latents.std())
    vae_result.vae.register_to_config(scaling_factor=scaling_factor)
    latent_seconds = time.perf_counter() - t
    log(f"latents: {tuple(latents.shape)}, scaling_factor {scaling_factor:.5f} "
        f"({latent_seconds:.0f}s)")

    blends, blend_stats = _blends(vae_result.vae, args, args.seed, log)
    unet_result = train_unet(
        latents, captions, tokenizer, scaling_factor, steps=args.unet_steps,
        batch_size=args.unet_batch, seed=args.seed, log=log,
        blends=blends, blend_fraction=args.blend_fraction,
    )
    log(f"unet: final eps-mse {unet_result.final_loss:.4f} after {unet_result.steps} steps")
    decoder_stats = _refine(vae_result.vae, images, args, log, colour_lerp)
    save_pipeline(out, unet_result.unet, vae_result.vae, unet_result.text_encoder,
                  make_scheduler())
    train_seconds = time.perf_counter() - started

    stats = {
        "command": "python -m embedded_model train " + " ".join(args.argv),
        "seed": args.seed,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "images": args.images,
        "vae_steps": args.vae_steps,
        "vae_batch": args.vae_batch,
        "vae_seconds": round(vae_result.seconds),
        "vae_final_mse": round(vae_result.final_loss, 6),
        "vae_psnr_db": round(vae_psnr, 2),
        "scaling_factor": scaling_factor,
        "latent_seconds": round(latent_seconds),
        "unet_steps": unet_result.steps,
        "unet_batch": args.unet_batch,
        "unet_seconds": round(unet_result.seconds),
        "unet_final_eps_mse": round(unet_result.final_loss, 5),
        "total_train_seconds": round(train_seconds),
        **decoder_stats,
        **blend_stats,
        **colour_lerp_stats,
    }
    _record(out, stats, evaluate=not args.skip_eval, log=log)
    log(f"done in {time.perf_counter() - started:.0f}s")


def _blends(vae, args: argparse.Namespace, seed: int, log) -> tuple[BlendBatch | None, dict]:
    """The blend scenes (blends.py) and their latents when --blend-fraction > 0, else nothing
    (and `train` is exactly what it was without the option)."""
    if args.blend_fraction <= 0:
        return None, {}
    from .blends import generate_blends

    t = time.perf_counter()
    images, captions_a, captions_b, ts = generate_blends(seed, args.blend_images)
    latents = encode_latents(vae, images)
    seconds = time.perf_counter() - t
    log(f"blends: {len(images)} blend scenes and latents in {seconds:.0f}s, "
        f"{args.blend_fraction:g} of each batch")
    return BlendBatch(latents, captions_a, captions_b, torch.from_numpy(ts)), {
        "blend_fraction": args.blend_fraction,
        "blend_images": args.blend_images,
        "blend_seconds": round(seconds),
    }


def _colour_lerp(args: argparse.Namespace, log) -> tuple[ColourLerpData | None, dict]:
    """The colour triplets of the VAE's latent-interpolation loss when --vae-colour-lerp > 0,
    else nothing (and the VAE trains exactly as without the option)."""
    if args.vae_colour_lerp <= 0:
        return None, {}
    from .blends import generate_colour_triplets

    t = time.perf_counter()
    data = ColourLerpData.from_triplets(*generate_colour_triplets(args.seed, args.vae_colour_lerp))
    log(f"colour triplets: {args.vae_colour_lerp} in {time.perf_counter() - t:.0f}s")
    return data, {"vae_colour_lerp": args.vae_colour_lerp}


def _demo_lerp_hues(vae) -> list[int | None]:
    """OKLCh hues of the decoded lerp (9 points) of the demo images' latents: what any morph of
    the demo pair passes through before the UNet has a say (logged after the VAE stage)."""
    from PIL import Image

    from .hue_path import DEMO_DIR, DEMO_ENDS, dominant_hue
    from .train_vae import to_tensor

    pictures = np.stack([np.asarray(Image.open(DEMO_DIR / n).convert("RGB")) for n in DEMO_ENDS])
    with torch.no_grad():
        means = vae.encode(to_tensor(pictures)).latent_dist.mean
        ts = torch.linspace(0, 1, 9)[:, None, None, None]
        decoded = vae.decode(torch.lerp(means[:1], means[1:], ts)).sample
    frames = ((decoded.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return [None if h is None else round(h) for h in map(dominant_hue, frames)]


def _refine(vae, images: np.ndarray, args: argparse.Namespace, log,
            colour_lerp: ColourLerpData | None = None) -> dict:
    """Decoder-only refinement (encoder, hence the UNet's latents, unchanged) and final PSNR."""
    t = time.perf_counter()
    mse = refine_decoder(vae, images, args.decoder_steps, seed=args.seed, log=log,
                         colour_lerp=colour_lerp)
    test_images, _ = dataset.generate(args.seed + 1, PSNR_IMAGES)
    psnr = round_trip_psnr(vae, test_images)
    log(f"decoder refinement: {args.decoder_steps} steps, final mse {mse:.5f}, "
        f"round-trip PSNR {psnr:.2f} dB")
    log(f"decoder refinement: decoded lerp of the demo's two latents, hues "
        f"{_demo_lerp_hues(vae)}")
    return {
        "decoder_steps": args.decoder_steps,
        "decoder_seconds": round(time.perf_counter() - t),
        "decoder_final_mse": round(mse, 6),
        "vae_psnr_db": round(psnr, 2),
    }


def refine(args: argparse.Namespace) -> None:
    """Run the decoder refinement stage on an already trained folder (same data and seed as
    `train`), then re-evaluate and rewrite the model card."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    out: Path = args.out
    stats = json.loads((out / "training.json").read_text())
    vae = AutoencoderKL.from_pretrained(str(out), subfolder="vae", torch_dtype=torch.float32)
    images, _ = dataset.generate(stats["seed"], stats["images"])
    args.seed = stats["seed"]
    stats["vae_psnr_before_refinement_db"] = stats["vae_psnr_db"]
    stats.update(_refine(vae, images, args, print))
    stats["total_train_seconds"] += stats["decoder_seconds"]
    stats["command"] += (f" --decoder-steps 0; python -m embedded_model refine-decoder "
                         f"--out {out} --decoder-steps {args.decoder_steps}")
    vae.to(WEIGHTS_DTYPE).save_pretrained(out / "vae", safe_serialization=True)
    _record(out, stats, evaluate=not args.skip_eval)


def continue_unet(args: argparse.Namespace) -> None:
    """Train a saved folder's UNet + text encoder (from their EMA weights) for more steps, or
    with --from-scratch train new ones exactly as `train` does, on the folder's VAE latents
    (the same data and seed as `train`); the VAE is untouched. Why --from-scratch: after a UNet
    architecture change it reproduces `train`'s result without re-running the VAE stages,
    whose output does not depend on the UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .export import save_text_encoder

    torch.set_num_threads(args.threads)
    out: Path = args.out
    stats = json.loads((out / "training.json").read_text())
    f32 = {"torch_dtype": torch.float32}
    vae = AutoencoderKL.from_pretrained(str(out), subfolder="vae", **f32)
    tokenizer = CLIPTokenizer.from_pretrained(str(out), subfolder="tokenizer")
    images, captions = dataset.generate(stats["seed"], stats["images"])
    latents = encode_latents(vae, images)
    blends, blend_stats = _blends(vae, args, stats["seed"], print)
    if args.from_scratch:
        training = dict(seed=stats["seed"])  # train_unet's defaults, as `train` uses them
    else:
        unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet", **f32)
        text_encoder = CLIPTextModel.from_pretrained(str(out), subfolder="text_encoder", **f32)
        training = dict(seed=stats["seed"] + 1, lr=args.lr, text_lr=args.lr,
                        init=(unet, text_encoder), warmup=50)
    result = train_unet(
        latents, captions, tokenizer, vae.config.scaling_factor, steps=args.unet_steps,
        batch_size=stats["unet_batch"], blends=blends, blend_fraction=args.blend_fraction,
        **training,
    )
    stats.update(blend_stats)
    result.unet.to(WEIGHTS_DTYPE).save_pretrained(out / "unet", safe_serialization=True)
    save_text_encoder(result.text_encoder, out / "text_encoder")
    if args.from_scratch:
        previous = stats["unet_seconds"] + stats.pop("unet_continued_seconds", 0)
        stats.pop("unet_continued_steps", None)
        stats["unet_steps"] = result.steps
        stats["unet_seconds"] = round(result.seconds)
        stats["total_train_seconds"] += round(result.seconds) - previous
    else:
        stats["unet_continued_steps"] = stats.get("unet_continued_steps", 0) + result.steps
        stats["unet_continued_seconds"] = (stats.get("unet_continued_seconds", 0)
                                           + round(result.seconds))
        stats["total_train_seconds"] += round(result.seconds)
        stats["command"] += (f"; python -m embedded_model continue-unet --out {out} "
                             f"--unet-steps {args.unet_steps} --lr {args.lr}"
                             + (f" --blend-fraction {args.blend_fraction:g} --blend-images "
                                f"{args.blend_images}" if blends is not None else ""))
    stats["unet_final_eps_mse"] = round(result.final_loss, 5)
    _record(out, stats, evaluate=not args.skip_eval)


def evaluate_cmd(args: argparse.Namespace) -> None:
    """Re-evaluate a folder and rewrite its training.json and model card."""
    torch.set_num_threads(args.threads)
    _record(args.out, json.loads((args.out / "training.json").read_text()), evaluate=True)


def _record(out: Path, stats: dict, evaluate: bool, log=print) -> None:
    """Optionally re-evaluate the folder, then write its training.json and model card: every
    command that changes a folder leaves the two in step with its weights."""
    if evaluate:
        stats.update(evaluate_folder(out, log))
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_model_card(out, stats)


def evaluate_folder(out: Path, log) -> dict:
    """Held-out prompt pass rates with guidance 1 (the morph's setting) and 5."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .evaluate import evaluate_prompts

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)  # fp32
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for guidance in (1.0, 5.0):
        verdicts, _ = evaluate_prompts(pipe, dataset.held_out_prompts(), guidance, EVAL_SEED)
        passed = sum(v.passed for v in verdicts)
        results[f"held_out_pass_guidance_{guidance:g}"] = f"{passed}/{len(verdicts)}"
        log(f"held-out prompts, guidance {guidance:g}: {passed}/{len(verdicts)} pass")
        for v in verdicts:
            log(f"  {'ok ' if v.passed else 'BAD'} {v.prompt}: {v.colour} {v.shape} "
                f"(iou {v.shape_iou:.2f})")
    return results


def demo_assets(args: argparse.Namespace) -> None:
    """The two demo input images, drawn by the generator, and their prompts."""
    args.out.mkdir(parents=True, exist_ok=True)
    demos = {"red_circle": ("red", "circle", "white"), "blue_triangle": ("blue", "triangle", "white")}
    prompts = {}
    for name, (colour, shape, background) in demos.items():
        dataset.render(dataset.centred_scene(colour, shape, background)).save(args.out / f"{name}.png")
        prompts[f"{name}.png"] = dataset.caption_for(colour, shape, background)
    (args.out / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")


def _blend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blend-fraction", type=float, default=0.0,
                   help="share of each UNet batch that is blend scenes on lerped text "
                   "(embedded_model/blends.py); 0 trains on pure scenes only")
    p.add_argument("--blend-images", type=int, default=3000,
                   help="number of blend scenes generated when --blend-fraction > 0")


def _folder_command(sub, name: str, help: str, func, skip_eval: bool = True):
    """A subcommand that works on a model folder: --out, --threads and (optionally) --skip-eval."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--out", type=Path, default=Path("models/tiny-shapes-sd"))
    p.add_argument("--threads", type=int, default=2)
    if skip_eval:
        p.add_argument("--skip-eval", action="store_true")
    p.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m embedded_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = _folder_command(sub, "train", "train the embedded model into --out", train)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--vae-steps", type=int, default=700)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--decoder-steps", type=int, default=200)
    p.add_argument("--vae-colour-lerp", type=int, default=0,
                   help="number of colour triplets for the VAE's latent-interpolation loss "
                   "(train_vae.ColourLerpData); 0 trains on reconstruction only")
    _blend_options(p)
    p = _folder_command(sub, "refine-decoder", "decoder-only refinement of a trained folder",
                        refine)
    p.add_argument("--decoder-steps", type=int, default=200)
    p = _folder_command(sub, "continue-unet", "train a saved folder's UNet + text encoder more",
                        continue_unet)
    p.add_argument("--unet-steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--from-scratch", action="store_true",
                   help="train a new UNet + text encoder as `train` does (its seed and learning "
                   "rates; --lr is for continuing), keeping the VAE")
    _blend_options(p)
    _folder_command(sub, "evaluate", "re-evaluate a folder, rewrite its model card", evaluate_cmd,
                    skip_eval=False)
    p = sub.add_parser("demo-assets", help="write the demo input images")
    p.add_argument("--out", type=Path, default=Path("assets/demo"))
    p.set_defaults(func=demo_assets)
    p = sub.add_parser("tokenizer", help="write only the CLIP tokenizer folder")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=lambda a: build_tokenizer(a.out))
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    args.func(args)


if __name__ == "__main__":
    main()
