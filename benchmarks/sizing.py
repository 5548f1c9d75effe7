"""Sizing: FLOPs per UNet call and per default morph, time floors on datasheet peaks, weights
and activation memory, and a frame_batch_size / workers-per-GPU rule, per published architecture.

    python -m benchmarks.sizing [--out docs/sizing.json] [--markdown docs/sizing.md]

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode (a multiply-add = 2
FLOPs; matmuls, convolutions and attention, not element-wise ops) over models built from
checkpoints.architectures' configs under FakeTensorMode (no memory, no time). The training step is
a real forward + backward with requires_grad only on LoRA parameters (peft LoraConfig on the
pipeline's LoRA target modules, unet.add_adapter): the backward computes input gradients through
the whole UNet but weight gradients only for the LoRA matrices, so it costs less than 2x forward.

The morph's UNet calls follow diffmorpher.pipeline (defaults read from MorphConfig): LoRA fitting
lora_steps steps over the K images (a sample fwd+bwd each), DDIM inversion num_inference_steps per
image, the reschedule's measuring pass (reschedule_probe_steps over every row of the sequence:
the K endpoints plus the intermediate frames) and the final pass (num_inference_steps over the
same rows), a VAE decode per row and pass, a VAE encode per image and the text encoder(s) per
prompt. FLOPs are linear in the batch, so frame_batch_size changes no count. Not counted: the
attention mixing of the replaced self-attention (element-wise), LPIPS of the reschedule, the
scheduler's arithmetic. "warm": LoRAs and inverted latents cached (those stages skipped), the
schedule cache off.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from checkpoints.architectures import ARCHITECTURES, Architecture
from diffmorpher.batching import ACTIVATION_FACTOR, activation_bytes, decode_bytes
from diffmorpher.config import DEFAULT_FRAME_BATCH, LORA_TARGET_MODULES, MorphConfig

LORA_TARGETS = list(LORA_TARGET_MODULES)  # the pipeline's own (diffmorpher.lora)
NUM_IMAGES = 2  # a morph of two images (the service's common case)
# Dense (no sparsity) BF16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets: A100 SXM 312,
# H100 SXM 989, H200 SXM 989 (same compute as H100), L4 121.
GPUS: dict[str, float] = {"A100": 312.0, "H100 SXM": 989.0, "H200": 989.0, "L4": 121.0}
FRACTIONS = (0.4, 1.0)
CARDS_GB = (24, 40, 80, 141)
# (architecture, pixel size) rows: each at its native size, SD 2.1-base and SDXL also at 768.
CASES: list[tuple[str, int]] = [("sd15", 512), ("sd21-base", 512), ("sd21-base", 768), ("sd21", 768),
                                ("sdxl-base", 1024), ("sdxl-base", 768)]
RESERVE_GB = 2.0  # CUDA context, allocator slack, LPIPS, the handler's own tensors


def _unet_inputs(arch: Architecture, size: int, batch: int) -> tuple[tuple, dict[str, Any]]:
    latent = size // 2 ** (len(arch.vae["block_out_channels"]) - 1)
    width = int(arch.unet["cross_attention_dim"])
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.randn(batch, 77, width)}
    if arch.is_sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280), "time_ids": torch.randn(batch, 6)}
    return (torch.randn(batch, 4, latent, latent), torch.full((batch,), 500)), kwargs


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def unet_flops(arch: Architecture, size: int, batch: int = 1, lora_rank: int | None = None) -> dict[str, int]:
    """FLOPs of one UNet forward, and of one LoRA training step (forward + backward)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    rank = lora_rank or MorphConfig().lora_rank
    with FakeTensorMode():
        unet = UNet2DConditionModel(**arch.unet)
        args, kwargs = _unet_inputs(arch, size, batch)

        def forward() -> None:
            with torch.no_grad():
                unet(*args, **kwargs)

        forward_flops = _count(forward)
    # peft cannot move its adapters' fake parameters (Module._apply's swap refuses FakeTensors):
    # the training step is built on the meta device instead (shapes only, equally free).
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.unet)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        args, kwargs = _unet_inputs(arch, size, batch)

        def train_step() -> None:
            unet(*args, **kwargs).sample.float().pow(2).mean().backward()

        train_flops = _count(train_step)
    return {"forward": forward_flops, "lora_train_step": train_flops, "lora_rank": rank}


def vae_flops(arch: Architecture, size: int) -> dict[str, int]:
    from diffusers import AutoencoderKL

    config = {k: v for k, v in arch.vae.items() if k not in ("force_upcast",)}
    with FakeTensorMode():
        vae = AutoencoderKL(**config)
        pixels = torch.randn(1, 3, size, size)
        latent = size // 2 ** (len(arch.vae["block_out_channels"]) - 1)
        with torch.no_grad():
            encode = _count(lambda: vae.encode(pixels))
            decode = _count(lambda: vae.decode(torch.randn(1, 4, latent, latent)))
    return {"encode": encode, "decode": decode}


def _text_encoders(arch: Architecture) -> list[torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    models = []
    for index, config in enumerate(arch.text_encoders):
        cls = CLIPTextModelWithProjection if arch.is_sdxl and index == 1 else CLIPTextModel
        models.append(cls(CLIPTextConfig(**config)))
    return models


def text_flops(arch: Architecture) -> int:
    with FakeTensorMode():
        models = _text_encoders(arch)
        ids = torch.zeros(1, 77, dtype=torch.long)
        with torch.no_grad():
            return sum(_count(lambda m=m: m(ids)) for m in models)


def parameters(arch: Architecture) -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with FakeTensorMode():
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**{k: v for k, v in arch.vae.items() if k != "force_upcast"})
        text = _text_encoders(arch)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"unet": count(unet), "vae": count(vae), "text_encoders": sum(count(m) for m in text)}


@dataclass
class MorphCalls:
    """Per-sample model calls of one morph of NUM_IMAGES images (diffmorpher.pipeline's stages)."""

    lora_train_steps: int  # sample fwd+bwd
    inversion_forwards: int
    reschedule_forwards: int
    frame_forwards: int
    vae_encodes: int
    vae_decodes: int
    text_encodes: int


def morph_calls(config: MorphConfig, warm: bool, num_images: int = NUM_IMAGES) -> MorphCalls:
    rows = num_images + (config.num_frames - 2) * (num_images - 1)  # endpoints + intermediate frames
    probe = config.reschedule_probe_steps if config.use_reschedule else 0
    lora = 0 if warm or not config.use_lora else config.lora_steps * num_images
    return MorphCalls(
        lora_train_steps=lora,
        inversion_forwards=0 if warm else config.num_inference_steps * num_images,
        reschedule_forwards=rows * probe,
        frame_forwards=rows * config.num_inference_steps,
        vae_encodes=num_images,
        vae_decodes=rows * (2 if config.use_reschedule else 1),
        text_encodes=num_images,
    )


def morph_flops(calls: MorphCalls, unet: dict[str, int], vae: dict[str, int], text: int) -> dict[str, int]:
    stages = {
        "lora": calls.lora_train_steps * unet["lora_train_step"],
        "inversion": calls.inversion_forwards * unet["forward"],
        "reschedule": calls.reschedule_forwards * unet["forward"],
        "frames": calls.frame_forwards * unet["forward"],
        "vae": calls.vae_encodes * vae["encode"] + calls.vae_decodes * vae["decode"],
        "text": calls.text_encodes * text,
    }
    return {**stages, "total": sum(stages.values())}


def activation_estimate_gb(arch: Architecture, size: int, bytes_per_value: int) -> float:
    """Peak inference activation per sample (documented estimate, the worker's own:
    diffmorpher.batching): the UNet's live tensors at its largest resolution, taken as
    ACTIVATION_FACTOR x the first block's feature map (batch 1, block_out_channels[0] x latent^2),
    or the decoder's largest live tensors (VAE decode of one frame: 3 x its widest
    full-resolution feature map, 128 x size^2), with SDPA (flash or memory-efficient attention:
    no materialised score matrix)."""
    unet = activation_bytes(arch.unet["block_out_channels"][0], size // 8, bytes_per_value)
    decode = decode_bytes(arch.vae["block_out_channels"][0], size, bytes_per_value)
    return max(unet, decode) / 1e9


def measure_sd15_forward_rss_gb() -> dict[str, float]:
    """Peak RSS growth of one real-size SD 1.5 UNet forward (random weights, fp32, batch 1, 512 px)
    on the CPU, over the RSS after building the model: weights excluded, activations included."""
    from diffusers import UNet2DConditionModel

    arch = ARCHITECTURES["sd15"]
    unet = UNet2DConditionModel(**arch.unet).eval()
    args, kwargs = _unet_inputs(arch, 512, 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    started = time.perf_counter()
    with torch.no_grad():
        unet(*args, **kwargs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {"peak_rss_growth_gb": peak - before, "seconds": time.perf_counter() - started}


def recommend(weights_gb: float, activation_gb: float, card_gb: float) -> dict[str, int]:
    """Workers per GPU and frame_batch_size. A morph is compute-bound, so more workers add no
    throughput beyond overlapping one worker's CPU/Python gaps with another's GPU work: two
    workers where each still gets a frame batch of at least 8, else one. Each worker holds its
    own weights plus RESERVE_GB; frame_batch_size is the largest power of two whose activations
    fit the rest, at most DEFAULT_FRAME_BATCH (16). 0 x 0: does not fit."""
    default_batch = DEFAULT_FRAME_BATCH

    def batch_for(workers: int) -> int:
        room = card_gb / workers - RESERVE_GB - weights_gb
        return 0 if room < activation_gb else min(2 ** int(math.log2(room / activation_gb)), default_batch)

    workers = 2 if batch_for(2) >= 8 else 1
    batch = batch_for(workers)
    return {"workers": workers if batch else 0, "frame_batch_size": batch}


def size_case(name: str, size: int, config: MorphConfig, measured: dict[str, float] | None = None) -> dict[str, Any]:
    arch = ARCHITECTURES[name]
    unet = unet_flops(arch, size)
    vae = vae_flops(arch, size)
    text = text_flops(arch)
    params = parameters(arch)
    morphs = {kind: morph_flops(morph_calls(config, kind == "warm"), unet, vae, text) for kind in ("cold", "warm")}
    floors = {gpu: {f"{int(f * 100)}%": {kind: morphs[kind]["total"] / (peak * 1e12 * f) for kind in morphs}
                    for f in FRACTIONS} for gpu, peak in GPUS.items()}
    total_params = sum(params.values())
    weights = {"bf16/fp16": total_params * 2 / 1e9, "fp32": total_params * 4 / 1e9}
    activation = activation_estimate_gb(arch, size, 2)
    return {
        "architecture": name, "size": size, "native": size == arch.resolution,
        "unet_flops": unet, "vae_flops": vae, "text_flops": text,
        "morph_calls": {kind: asdict(morph_calls(config, kind == "warm")) for kind in ("cold", "warm")},
        "morph_flops": morphs, "time_floor_s": floors, "parameters": params, "weights_gb": weights,
        "activation_gb_per_sample_bf16": {"value": activation, "kind": "estimate"},
        "recommendation": {f"{card} GB": recommend(weights["bf16/fp16"], activation, card) for card in CARDS_GB},
    }


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    out = [
        "# Sizing: FLOPs, time floors and memory per architecture",
        "",
        f"Produced by `{report['command']}` (benchmarks/sizing.py; JSON beside it). Counted with "
        "torch.utils.flop_counter under FakeTensorMode (a multiply-add = 2 FLOPs); morph of "
        f"{NUM_IMAGES} images with MorphConfig's defaults: num_frames={cfg['num_frames']}, "
        f"lora_steps={cfg['lora_steps']}, num_inference_steps={cfg['num_inference_steps']}, "
        f"reschedule probe {cfg['reschedule_probe_steps']} steps, attention replaced for "
        f"{cfg['num_attn_replace_steps']} steps (same FLOPs), frame_batch_size={cfg['frame_batch_size']} "
        "(FLOPs are linear in the batch). Cold: LoRA fit + inversion + reschedule + frames; warm: LoRAs "
        "and inverted latents cached, schedule cache off. LoRA step: real forward + backward, gradients "
        f"only for the rank-{report['cases'][0]['unet_flops']['lora_rank']} LoRA on to_q/to_k/to_v/to_out.0.",
        "",
        "## FLOPs",
        "",
        "| model | px | UNet fwd (TFLOP) | LoRA step fwd+bwd (TFLOP) | VAE enc / dec (TFLOP) | text (GFLOP) | cold morph (PFLOP) | warm morph (PFLOP) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        u, v = c["unet_flops"], c["vae_flops"]
        out.append(f"| {c['architecture']} | {c['size']}{'' if c['native'] else ' (non-native)'} | "
                   f"{u['forward'] / 1e12:.3f} | {u['lora_train_step'] / 1e12:.3f} | "
                   f"{v['encode'] / 1e12:.2f} / {v['decode'] / 1e12:.2f} | {c['text_flops'] / 1e9:.1f} | "
                   f"{c['morph_flops']['cold']['total'] / 1e15:.2f} | {c['morph_flops']['warm']['total'] / 1e15:.2f} |")
    out += ["", "Cold morph by stage (PFLOP): lora / inversion / reschedule / frames / VAE / text", ""]
    for c in report["cases"]:
        m = c["morph_flops"]["cold"]
        out.append(f"- {c['architecture']} {c['size']}: " + " / ".join(
            f"{m[k] / 1e15:.3f}" for k in ("lora", "inversion", "reschedule", "frames", "vae", "text")))
    out += ["", "## Time floor per morph (s): FLOPs / (fraction x datasheet dense BF16 peak)", "",
            "Peaks (NVIDIA datasheets, dense, no sparsity): " + ", ".join(f"{g} {p:.0f} TFLOP/s" for g, p in GPUS.items())
            + ". A floor, not a prediction: element-wise ops, attention mixing, LPIPS, Python overhead not included.", "",
            "| model | px | " + " | ".join(f"{g} @{int(f * 100)}% cold / warm" for g in GPUS for f in FRACTIONS) + " |",
            "|---|---|" + "---|" * (len(GPUS) * len(FRACTIONS))]
    for c in report["cases"]:
        cells = [f"{c['time_floor_s'][g][f'{int(f * 100)}%']['cold']:.1f} / {c['time_floor_s'][g][f'{int(f * 100)}%']['warm']:.1f}"
                 for g in GPUS for f in FRACTIONS]
        out.append(f"| {c['architecture']} | {c['size']} | " + " | ".join(cells) + " |")
    out += ["", "## Memory", "",
            "Weights: parameter count x bytes (UNet + VAE + text encoders), counted. Activation per "
            "sample: **estimate** (activation_estimate_gb: "
            f"{ACTIVATION_FACTOR} x the UNet's first feature map, or the VAE decoder's widest map, in bf16, with SDPA attention).", "",
            "| model | px | params (M) UNet / VAE / text | weights bf16 (GB) | weights fp32 (GB) | activation / sample bf16 (GB, est.) | "
            + " | ".join(f"{g} GB: workers x frame_batch_size" for g in CARDS_GB) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(CARDS_GB)]
    for c in report["cases"]:
        p = c["parameters"]
        rec = [f"{r['workers']} x {r['frame_batch_size']}" for r in c["recommendation"].values()]
        out.append(f"| {c['architecture']} | {c['size']} | {p['unet'] / 1e6:.0f} / {p['vae'] / 1e6:.0f} / {p['text_encoders'] / 1e6:.0f} | "
                   f"{c['weights_gb']['bf16/fp16']:.2f} | {c['weights_gb']['fp32']:.2f} | "
                   f"{c['activation_gb_per_sample_bf16']['value']:.2f} | " + " | ".join(rec) + " |")
    if report.get("measured"):
        m = report["measured"]
        out += ["", f"**Measured** (calibration): one SD 1.5 UNet forward at 512 px, batch 1, fp32, CPU: peak RSS "
                f"growth {m['peak_rss_growth_gb']:.2f} GB in {m['seconds']:.1f} s (random weights; ru_maxrss, so a "
                "lower bound: an earlier peak while building the model can mask part of it). The estimate "
                "column is meant to stay above this (bf16 = half of fp32)."]
    out += served_runs_markdown(report.get("served_runs", []))
    out += ["", "Not in the estimate column: the LoRA fit's activations kept for the backward (autograd, batch "
            "of the K images), which exceed the inference figures; the served runs above include them "
            "(a whole worker's peak). Size a card for that stage by a run (make sized-e2e, make gpu-check's "
            "peak GPU memory) before trusting the frame_batch_size column at the limit."]
    out += ["", "Rule (benchmarks.sizing.recommend): a morph is compute-bound, so a second worker only "
            "overlaps one worker's CPU/Python gaps: two workers where each still gets a frame batch of "
            f">= 8, else one; each worker holds its own weights plus {RESERVE_GB:.0f} GB reserve; "
            "frame_batch_size the largest power of two whose (estimated) activations fit the rest, at "
            "most DEFAULT_FRAME_BATCH (16). 0 x 0: does not fit."]
    out += ["", *WORKER_RULE]
    return "\n".join(out) + "\n"


SIZED_E2E_RESULTS = Path(__file__).resolve().parent / "results"


def served_runs(results: Path = SIZED_E2E_RESULTS) -> list[dict[str, Any]]:
    """The committed `make sized-e2e` runs (benchmarks/sized_e2e.py's JSON), in architecture order."""
    order = list(ARCHITECTURES)
    runs = [json.loads(path.read_text()) for path in sorted(results.glob("sized-e2e-*.json"))]
    return sorted(runs, key=lambda run: (order.index(run["arch"]) if run["arch"] in order else len(order),
                                         run.get("dtype", "float32")))


def served_runs_markdown(runs: list[dict[str, Any]]) -> list[str]:
    """Measured through the whole served path at real size: what the worker process really held."""
    if not runs:
        return []
    out = ["", "**Measured through the served path** (`make sized-e2e`: a random-weight model of the "
           "architecture exported, served by TorchServe and morphed through the gateway at its native "
           "resolution, 2 images, 1 LoRA step, 2 DDIM steps, 3 frames, reschedule on; CPU worker, no GPU). "
           "Peak RSS is the worker's high-water mark: weights + LoRA fit (autograd, both images unless "
           "frame_batch_size=1) + the passes. Seconds are this 2-core host's, often shared: compare "
           "memory, not speed.", "",
           "| model | px | dtype | options | folder (GB) | time to ready (s) | worker peak RSS (GB) | "
           "morph (s) | UNet forward (s, batch 1) | LoRA step (s, both images) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        options = ", ".join(f"{key}={value}" for key, value in (run.get("options") or {}).items()) or "-"
        out.append(f"| {run['arch']} | {run['resolution']} | {run.get('dtype', 'float32')} | {options} | "
                   f"{run['model_bytes'] / 1e9:.2f} | {run['ready_s']:.0f} | {run['worker_peak_rss_bytes'] / 1e9:.1f} | "
                   f"{run['morph_s']:.0f} | {run['unet_forward_s']:.1f} | {run['lora_step_s']:.1f} |")
    notes = [f"- {run['arch']} ({run.get('dtype', 'float32')}): {run['note']}" for run in runs if run.get("note")]
    return out + ([""] + notes if notes else [])


# The worker's own choice of frame_batch_size (diffmorpher.batching), as docs/sizing.md states it.
WORKER_RULE: list[str] = [
    "## Frame batch on a GPU (the worker's rule)",
    '',
    "With `frame_batch_size` 0 (MorphConfig's default: auto), each morph takes its rows per UNet call from the device's free memory as it starts (`diffmorpher.batching.frame_batch_size`, from `DiffMorpherPipeline.frame_batch_size`):",
    '',
    "- free = `torch.cuda.mem_get_info`'s free bytes + what this process's caching allocator holds unused;",
    "- reserve = 1 GiB (`RESERVE_BYTES`: allocator slack, LPIPS, the attention store, the pass's latents) + one VAE slice's decode (`vae_batch_size` x 3 x the decoder's widest map, 128 x px^2, x its dtype's bytes);",
    "- per sample = `ACTIVATION_FACTOR` (40) x the UNet's first feature map (block_out_channels[0] x latent^2) x the run dtype's bytes (the estimate of the table above);",
    '- frame_batch_size = the largest power of two <= (free - reserve) / per sample, between 1 and 16 (`DEFAULT_FRAME_BATCH`). On the CPU and MPS (no free-memory figure) it is 16, as before.',
    '',
    'Examples in bf16 (vae_batch_size 4): SD 2.1-base at 512 px: 0.105 GB a sample, reserve 1.88 GB; 20 GB free gives 16 (the cap), 2.5 GB free gives 4. SDXL at 1024 px: 0.42 GB a sample, reserve 4.3 GB; 10 GB free gives 8.',
    '',
    "A frame batch, an inversion batch or a LoRA fit's chunk of images that still runs out of memory (an estimate is an estimate; the fit's backward needs more than inference; another worker's morph shares the card) is not the morph's end: the cached memory is released, the part halved and retried down to one row, and the rest of the stage keeps the size that fit (`DiffMorpherPipeline._split_on_oom`); only one row that does not fit fails the morph (out_of_memory, 507). VAE encode and decode run `vae_batch_size` images per call (MorphConfig, default 4), so the decoder's full-resolution maps do not grow with the frame batch.",
]


def build_report(cases: list[tuple[str, int]], measure: bool, command: str) -> dict[str, Any]:
    config = MorphConfig()
    measured = measure_sd15_forward_rss_gb() if measure else None
    return {
        "command": command,
        "config": {**{k: getattr(config, k) for k in ("num_frames", "lora_steps", "num_inference_steps",
                                                    "use_reschedule", "lora_rank")},
                   "frame_batch_size": config.frame_batch_size or DEFAULT_FRAME_BATCH,
                   "reschedule_probe_steps": config.reschedule_probe_steps,
                   "num_attn_replace_steps": config.num_attn_replace_steps},
        "gpus_tflops_bf16_dense": GPUS,
        "measured": measured,
        "cases": [size_case(name, size, config) for name, size in cases],
        "served_runs": served_runs(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sizing", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/sizing.json"))
    parser.add_argument("--markdown", type=Path, help="also write the tables (e.g. docs/sizing.md)")
    parser.add_argument("--measure", action="store_true", help="measure one real SD 1.5 forward on the CPU (~4 GB RAM)")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.sizing" + (" --measure" if args.measure else "") + f" --out {args.out}" + (
        f" --markdown {args.markdown}" if args.markdown else "")
    report = build_report(CASES, args.measure, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
