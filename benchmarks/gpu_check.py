"""`make gpu-check`: the one command for the day a GPU is available.

    python -m benchmarks.gpu_check [--arch sd21-base] [--frames 16] [--resolution 512] [--out DIR]
    python -m benchmarks.gpu_check --fake      (what CI runs: the same script on fake CUDA tensors)

Real mode (a CUDA device present): writes or reuses a random-weight model of `--arch`
(benchmarks/sized_model.py; only the pictures are noise, the cost is the real model's), loads it
with the core's loader on CUDA in bf16 and runs morphs through the pipeline's entry point, the
call the TorchServe handler makes, for each preset (default, fast) x compile (off, on) x cache
(cold: empty, so LoRAs are fitted and images inverted; warm: the same morph again on the filled
cache, so LoRAs, inverted latents and the rescheduled alphas are hits), each compile mode after
an untimed-for-the-goal warm-up morph (one-off costs; with compile on, the compilation). After the
first preset's pair, one pass under
`torch.cuda.set_sync_debug_mode("error")` (the first host sync, or "none") and one under
`torch.profiler` (top kernels by GPU time, GPU idle fraction = 1 - busy kernel time / wall time).
Each morph is set against its FLOP floor: the FLOPs of the model calls it actually made
(benchmarks/sizing.py's counts, the numbers of docs/sizing.md) over the GPU's dense bf16 peak.

Fake mode (`--fake`): the same runs, table and JSON on FakeTensorMode tensors "on CUDA", with the
CPU as the default device as in a real worker, models of the architecture's published sizes
built inside the mode (no weights, no memory), a small latent and tiny step counts. What cannot
follow without a driver says so in the output: timings are not meaningful; LoRAs are fitted with
0 steps (a LoRA step's backward on CUDA tensors needs a driver, pytorch/pytorch#92627); the
reschedule is off (its alphas are read back to the host: values a fake tensor does not have);
compile uses dynamo's `eager` backend (inductor generates kernels for a real device); the sync
check runs without `set_sync_debug_mode` (it needs a driver), the fake mode itself raising on
any value read back to the host; the profiler records CPU activity only. Frames come back as
blank images of the right size (turning pixels into PIL images reads values).

Output: a table on stdout and JSON in `<out>/gpu-check-<UTC time>.json` (docs/gpu-check.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import diffmorpher.pipeline as pipeline_module
from diffmorpher.cache import DiskStore, TensorCache
from diffmorpher.compile import compile_unet_blocks
from diffmorpher.config import MorphConfig
from diffmorpher.interrupt import StopCheck, never_stop
from diffmorpher.pipeline import DiffMorpherPipeline
from embedded_model.morph_pairs import morph_pair

from checkpoints.architectures import ARCHITECTURES, Architecture
from .bench import STAGES, PeakMemory
from .sized_model import write_random_model
from .sizing import GPUS, MorphCalls, morph_calls, morph_flops, text_flops, unet_flops, vae_flops

REPO_ROOT = Path(__file__).resolve().parent.parent
LPIPS_WEIGHTS = REPO_ROOT / ".cache" / "lpips" / "lpips_alex_backbone.safetensors"
PRESETS_CHECKED = ("default", "fast")
COMPILE_CHECKED = ("off", "on")
# Issue 24's goal for SD 2.1-base, 512 px, bf16, 16 frames on one H100/H200, default preset.
GOAL_S = {"cold": 8.0, "warm": 3.0}
GOAL_CASE = ("sd21-base", 512, 16)
# Fake mode: every stage's code path at the least cost (fake ops cost per op, not per element).
FAKE_RESOLUTION = 64
FAKE_OPTIONS: dict[str, Any] = {"lora_steps": 0, "num_inference_steps": 2, "use_reschedule": False}
FAKE_PEAK_GPU = "H200"  # the goal's card, for the floor column of a fake run
TOP_KERNELS = 10
WARM_UP = "warm-up"  # the preset column of the warm-up morph


@dataclass(frozen=True)
class Target:
    """Where the check runs: a real CUDA device, or fake CUDA tensors."""

    fake: bool
    device: torch.device
    gpu: str  # the sizing.GPUS entry whose peak gives the FLOP floor
    compile_backend: str

    @classmethod
    def detect(cls, fake: bool) -> "Target":
        if fake:
            return cls(True, torch.device("cuda"), FAKE_PEAK_GPU, "eager")
        if not torch.cuda.is_available():
            raise SystemExit("gpu-check needs a CUDA device (or --fake, the CI mode)")
        return cls(False, torch.device("cuda"), peak_gpu(torch.cuda.get_device_name()), "inductor")


def peak_gpu(device_name: str) -> str:
    """The sizing.GPUS entry for a CUDA device name ("NVIDIA H200", "NVIDIA H100 80GB HBM3");
    an unknown card is floored at the H100's peak (the issue's reference card)."""
    for gpu in GPUS:
        if re.search(rf"\b{re.escape(gpu.split()[0])}\b", device_name):
            return gpu
    return "H100 SXM"


# ---------------------------------------------------------------------------- FLOP floor
@dataclass(frozen=True)
class ModelFlops:
    """FLOPs of one call of each model at one resolution (benchmarks.sizing's counters)."""

    unet: dict[str, int]
    vae: dict[str, int]
    text: int

    @classmethod
    def count(cls, arch: Architecture, resolution: int, lora_rank: int) -> "ModelFlops":
        return cls(unet_flops(arch, resolution, lora_rank=lora_rank), vae_flops(arch, resolution), text_flops(arch))


def executed_calls(config: MorphConfig, cache: list[dict], schedule_cache: str) -> MorphCalls:
    """The model calls a morph made: sizing.morph_calls' cold morph, less the stages the cache
    answered (LoRAs and inverted latents found for every image; the rescheduled alphas found)."""
    calls = morph_calls(config, warm=False)
    if cache and all(entry["lora"] == "hit" for entry in cache):
        calls = replace(calls, lora_train_steps=0)
    if cache and all(entry["latent"] == "hit" for entry in cache):
        calls = replace(calls, inversion_forwards=0)
    if schedule_cache == "hit":
        calls = replace(calls, reschedule_forwards=0, vae_decodes=calls.frame_forwards // config.num_inference_steps)
    return calls


def flop_floor_s(calls: MorphCalls, flops: ModelFlops, gpu: str) -> tuple[int, float]:
    """(FLOPs, seconds at the GPU's dense bf16 peak) of these calls."""
    total = morph_flops(calls, flops.unet, flops.vae, flops.text)["total"]
    return total, total / (GPUS[gpu] * 1e12)


# ---------------------------------------------------------------------------- one morph
@dataclass
class MorphRun:
    """One morph's numbers, as the table and the JSON show them."""

    preset: str
    compile: str
    cache: str  # "cold" (empty cache), "warm" (the same morph again), "none" (the warm-up)
    wall_s: float
    stages_s: dict[str, float]
    floor_flops: int
    floor_s: float
    peak_gpu_mib: float | None  # None on fake CUDA
    peak_rss_mib: float
    cache_report: list[dict] = field(default_factory=list)
    schedule_cache: str = "off"
    host_copies: dict[str, dict[str, int]] | None = None  # fake mode: {stage: {direction: copies}}

    @property
    def over_floor(self) -> float:
        return self.wall_s / self.floor_s if self.floor_s else float("nan")


@dataclass
class Inputs:
    """The morph every run repeats: one fixed pair, its prompts, the config of each preset."""

    images: list[Image.Image]
    prompts: list[str]
    configs: dict[str, MorphConfig]


@dataclass(frozen=True)
class CheckPlan:
    """What one check runs: the model, the morph's size, and which presets and compile modes."""

    arch: Architecture
    frames: int
    resolution: int
    presets: tuple[str, ...] = PRESETS_CHECKED
    compile_modes: tuple[str, ...] = COMPILE_CHECKED


def morph_inputs(target: Target, plan: CheckPlan) -> Inputs:
    images, prompts = morph_pair(0)
    base = {"num_frames": plan.frames, "resolution": plan.resolution, "dtype": "bfloat16",
            **(FAKE_OPTIONS if target.fake else {})}
    # Options given explicitly win over the preset's (config.with_preset): fake mode's tiny steps.
    configs = {preset: MorphConfig.from_dict({"preset": preset, **base}) for preset in plan.presets}
    return Inputs(images, prompts, configs)


class GpuMemory:
    """Peak CUDA memory allocated while a block runs (None on fake CUDA)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.peak_mib: float | None = None

    def __enter__(self) -> "GpuMemory":
        if not self.target.fake:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.target.fake:
            torch.cuda.synchronize()
            self.peak_mib = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def warm_up(pipe: DiffMorpherPipeline, inputs: Inputs, compile_mode: str, target: Target, flops: ModelFlops,
            copies: "CopyCounter") -> MorphRun:
    """An untimed-for-the-goal morph with few steps and no cache, before the measured ones: the
    process's one-off costs (CUDA context, cuBLAS/cuDNN set-up, LPIPS; with compile on, the
    compilation of every block, whose shapes the measured morphs share) land here, not in "cold"."""
    pipe.cache = None
    first = next(iter(inputs.configs.values()))
    config = first.replace(lora_steps=min(1, first.lora_steps), num_inference_steps=2)
    return run_morph(pipe, replace(inputs, configs={WARM_UP: config}), WARM_UP, compile_mode, "none", target,
                     flops, copies)


def run_morph(pipe: DiffMorpherPipeline, inputs: Inputs, preset: str, compile_mode: str, cache: str,
              target: Target, flops: ModelFlops, copies: "CopyCounter") -> MorphRun:
    config = inputs.configs[preset]
    with PeakMemory() as rss, GpuMemory(target) as gpu, copies.per_stage() as counted:
        started = time.perf_counter()
        result = pipe(inputs.images, inputs.prompts, config)
        wall = time.perf_counter() - started
    floor_flops, floor_s = flop_floor_s(executed_calls(config, result.cache, result.schedule_cache), flops, target.gpu)
    return MorphRun(
        preset=preset, compile=compile_mode, cache=cache, wall_s=round(wall, 3),
        stages_s={stage: round(float(result.timings.get(stage, 0.0)), 3) for stage in STAGES},
        floor_flops=floor_flops, floor_s=floor_s, peak_gpu_mib=gpu.peak_mib,
        peak_rss_mib=round(rss.peak / 2**20, 1), cache_report=result.cache,
        schedule_cache=result.schedule_cache, host_copies=counted(),
    )


# The pipeline's stage methods and the stage (pipeline.__call__'s timings) each belongs to.
STAGE_METHODS = {"encode_prompts": "encode", "encode_images": "encode", "fit_loras": "lora",
                 "invert": "inversion", "reschedule": "reschedule", "denoise_sequence": "frames"}
OTHER = "other"  # copies outside the stage methods (cache plan, the result's latents and frames)


class CopyCounter:
    """Host<->device copies of each morph by pipeline stage, where they can be counted: on fake
    CUDA (benchmarks.fake_cuda.TransferCounter), with this pipeline's stage methods labelled
    (wrapped on the instance, so the class and other pipelines are untouched). Elsewhere None."""

    def __init__(self, pipe: DiffMorpherPipeline | None = None) -> None:
        self.counter: Any = None
        self.enabled = pipe is not None
        if pipe is None:
            return
        for method, stage in STAGE_METHODS.items():
            setattr(pipe, method, self._labelled(getattr(pipe, method), stage))

    def _labelled(self, method: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def labelled(*args: Any, **kwargs: Any) -> Any:
            with self.counter.stage(stage) if self.counter is not None else contextlib.nullcontext():
                return method(*args, **kwargs)

        return labelled

    @contextlib.contextmanager
    def per_stage(self) -> Iterator[Callable[[], dict[str, dict[str, int]] | None]]:
        """Yields a callable giving the block's copies as {stage: {direction: count}} (by the
        outermost stage: the reschedule's measuring pass is the reschedule's), or None."""
        if not self.enabled:
            yield lambda: None
            return
        from .fake_cuda import DEVICE_TO_HOST, HOST_TO_DEVICE, UNLABELLED, TransferCounter

        with TransferCounter() as counter:
            self.counter = counter
            try:
                yield lambda: {stage: {HOST_TO_DEVICE: n_in, DEVICE_TO_HOST: n_out}
                               for stage, (n_in, n_out) in _by_stage(counter.transfers, UNLABELLED).items()}
            finally:
                self.counter = None

def _by_stage(transfers: Sequence[Any], unlabelled: str) -> dict[str, tuple[int, int]]:
    """(host->device, device->host) counts per outermost stage label, in pipeline order."""
    from .fake_cuda import HOST_TO_DEVICE

    counts: dict[str, list[int]] = {stage: [0, 0] for stage in [*dict.fromkeys(STAGE_METHODS.values()), OTHER]}
    for transfer in transfers:
        stage = transfer.stage.split("/")[0]
        counts[OTHER if stage == unlabelled else stage][0 if transfer.direction == HOST_TO_DEVICE else 1] += 1
    return {stage: (n_in, n_out) for stage, (n_in, n_out) in counts.items()}


# ---------------------------------------------------------------------------- sync check
def sync_check(pipe: DiffMorpherPipeline, inputs: Inputs, preset: str, target: Target) -> dict[str, str]:
    """One cold morph under `torch.cuda.set_sync_debug_mode("error")`: the first
    operation that makes the host wait for the GPU raises, and its place in the project is the
    answer ("none": the morph never synchronised). On fake CUDA the mode needs a driver; the
    fake mode raises instead on any value read back to the host."""
    pipe.cache = None
    note = ("fake CUDA: set_sync_debug_mode needs a driver; FakeTensorMode raises on any value read "
            "back to the host instead" if target.fake else 'torch.cuda.set_sync_debug_mode("error")')
    if not target.fake:
        torch.cuda.set_sync_debug_mode("error")
    try:
        pipe(inputs.images, inputs.prompts, inputs.configs[preset])
    except RuntimeError as error:
        if not is_sync_error(error):
            raise
        return {"preset": preset, "first_sync": project_frame(error), "error": str(error).splitlines()[0][:200],
                "how": note}
    finally:
        if not target.fake:
            torch.cuda.set_sync_debug_mode(0)
    return {"preset": preset, "first_sync": "none", "how": note}


def is_sync_error(error: RuntimeError) -> bool:
    """The sync debug mode's error, or the fake mode's refusal to produce a value."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    return isinstance(error, DataDependentOutputException) or "synchronizing" in str(error)


def project_frame(error: BaseException) -> str:
    """The innermost frame of the traceback in this repository's code: `path:line in function`."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename.startswith(str(REPO_ROOT)) and "/.venv/" not in f.filename]
    if not frames:
        return "outside the project"
    frame = frames[-1]
    return f"{Path(frame.filename).relative_to(REPO_ROOT)}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


# ---------------------------------------------------------------------------- profiler
def profile_pass(pipe: DiffMorpherPipeline, inputs: Inputs, preset: str, cache: TensorCache,
                 target: Target) -> dict[str, Any]:
    """One warm morph under torch.profiler: the top kernels by GPU time and the GPU's
    idle fraction over the morph's wall time (1 - union of kernel intervals / wall). On fake
    CUDA, CPU activity only: the top operators by CPU time, no idle fraction."""
    pipe.cache = cache
    activities = [ProfilerActivity.CPU] + ([] if target.fake else [ProfilerActivity.CUDA])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        pipe(inputs.images, inputs.prompts, inputs.configs[preset])
        if not target.fake:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - started
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    if kernels:
        busy_s = busy_time_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6
        return {"preset": preset, "wall_s": round(wall_s, 3), "kernels": len(kernels), "gpu_busy_s": round(busy_s, 3),
                "gpu_idle_fraction": round(1 - busy_s / wall_s, 4),
                "top": top_by_time([(e.name, e.time_range.end - e.time_range.start, 1) for e in kernels]),
                "what": "CUDA kernels by GPU time"}
    cpu_ops = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    return {"preset": preset, "wall_s": round(wall_s, 3), "kernels": 0, "gpu_busy_s": None, "gpu_idle_fraction": None,
            "top": top_by_time(cpu_ops), "what": "operators by CPU time"
            + (" (fake CUDA: no driver, so no kernels; CPU activity only)" if target.fake else "")}


def busy_time_us(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (overlapping kernels count once)."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy


def top_by_time(items: Sequence[tuple[str, float, int]], top: int = TOP_KERNELS) -> list[dict[str, Any]]:
    """The names with the most total time ((name, microseconds, calls) items, summed by name),
    with their share of all of it."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, us, calls in items:
        totals[name] = totals.get(name, 0.0) + us
        counts[name] = counts.get(name, 0) + calls
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return [{"name": name[:100], "ms": round(us / 1e3, 3), "share": round(us / whole, 4), "calls": counts[name]}
            for name, us in ranked]


# ---------------------------------------------------------------------------- caches
class MemoryStore:
    """A CacheStore in a dict (bytes by key, locks that never wait): one process, one check."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.entries.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.entries[key] = data

    def lock(self, key: str, stop: StopCheck = never_stop) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class FakeTensorCache(TensorCache):
    """TensorCache holding the tensors themselves: fake tensors have no bytes to serialise. The
    copy to the CPU on save is kept (the real cache's device-to-host copy)."""

    def __init__(self) -> None:
        super().__init__(MemoryStore())
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        return self.tensors.get(key)

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors[key] = {name: t.detach().to("cpu") for name, t in tensors.items()}


@contextlib.contextmanager
def new_cache(target: Target) -> Iterator[TensorCache]:
    """An empty cache: on disk as a worker's (real mode), in memory (fake mode)."""
    if target.fake:
        yield FakeTensorCache()
        return
    with tempfile.TemporaryDirectory(prefix="gpu-check-cache-") as folder:
        yield TensorCache(DiskStore(Path(folder)))


# ---------------------------------------------------------------------------- the check
@dataclass
class CheckReport:
    mode: str  # "real" or "fake"
    arch: str
    resolution: int
    frames: int
    device: str
    peak_gpu: str
    peak_tflops: float
    model_flops: ModelFlops  # per call, at this resolution: what the floors are made of
    runs: list[MorphRun]
    sync: dict[str, str]
    profile: dict[str, Any]
    compile_stats: dict[str, int] | None  # dynamo's counters after the compile-on runs
    configs: dict[str, dict]
    machine: dict[str, Any]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for run, row in zip(self.runs, data["runs"]):
            row["over_floor"] = round(run.over_floor, 2)
        return data


def check(pipe: DiffMorpherPipeline, target: Target, plan: CheckPlan, copies: CopyCounter) -> CheckReport:
    """Every run of the check on one loaded pipeline: compile off first (compiling is in place).
    The profiler and sync passes follow the first preset's cold and warm morphs."""
    arch, resolution, frames = plan.arch, plan.resolution, plan.frames
    inputs = morph_inputs(target, plan)
    flops = ModelFlops.count(arch, resolution, MorphConfig().lora_rank)
    runs: list[MorphRun] = []
    sync: dict[str, str] = {}
    profiled: dict[str, Any] = {}
    for compile_mode in sorted(plan.compile_modes, key=COMPILE_CHECKED.index):
        # Dynamo does not trace under an active dispatch mode (it runs the blocks as they are), so
        # copies are counted with compile off only: with it on, compiling is what is checked.
        counting = copies if compile_mode == "off" else CopyCounter()
        if compile_mode == "on":
            compiled = compile_unet_blocks(pipe.models.unet, backend=target.compile_backend)
            print(f"compiled {compiled} UNet blocks ({target.compile_backend})", flush=True)
        runs.append(warm_up(pipe, inputs, compile_mode, target, flops, counting))
        print(f"warm-up compile {compile_mode}: {runs[-1].wall_s:.2f} s", flush=True)
        for preset in plan.presets:
            with new_cache(target) as cache:
                pipe.cache = cache
                for kind in ("cold", "warm"):
                    runs.append(run_morph(pipe, inputs, preset, compile_mode, kind, target, flops, counting))
                    print(f"{preset} compile {compile_mode} {kind}: {runs[-1].wall_s:.2f} s", flush=True)
                if not profiled:
                    profiled = profile_pass(pipe, inputs, preset, cache, target)
                    sync = sync_check(pipe, inputs, preset, target)
    return CheckReport(
        mode="fake" if target.fake else "real", arch=arch.name, resolution=resolution, frames=frames,
        device=torch.cuda.get_device_name() if not target.fake else "fake cuda (FakeTensorMode)",
        peak_gpu=target.gpu, peak_tflops=GPUS[target.gpu], model_flops=flops, runs=runs, sync=sync, profile=profiled,
        compile_stats=dynamo_stats() if "on" in plan.compile_modes else None,
        configs={preset: config.to_dict() for preset, config in inputs.configs.items()},
        machine={"platform": platform.platform(), "torch": torch.__version__,
                 "cuda": torch.version.cuda, "compile_backend": target.compile_backend},
        notes=notes(target, arch, frames, resolution),
    )


def dynamo_stats() -> dict[str, int]:
    """What torch.compile made of the blocks (torch._dynamo's process-wide counters): graphs
    compiled, frames traced, and how often a block's code hit the recompile limit. Every
    ResnetBlock2D shares one `forward`, so its shapes (channels, sizes, batch) share one cache
    of `recompile_limit` graphs; past it a block runs eager, which this makes visible."""
    from torch._dynamo.utils import counters

    limit_hits = sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason.lower())
    return {"unique_graphs": int(counters["stats"]["unique_graphs"]), "frames_total": int(counters["frames"]["total"]),
            "frames_ok": int(counters["frames"]["ok"]), "recompile_limit_hits": int(limit_hits),
            "recompile_limit": int(torch._dynamo.config.recompile_limit)}


def notes(target: Target, arch: Architecture, frames: int, resolution: int) -> list[str]:
    lines = ["floor: FLOPs of the model calls the morph made (benchmarks/sizing.py, docs/sizing.md) "
             "at 100% of the card's dense bf16 peak; stage seconds end with a device synchronise (true GPU time)"]
    if target.fake:
        lines += ["FAKE CUDA: timings and memory are NOT meaningful (no kernels run); the code paths are",
                  f"fake: {FAKE_OPTIONS} at {resolution} px (LoRA backward on CUDA needs a driver, "
                  "pytorch/pytorch#92627; the reschedule reads its alphas back to the host); compile "
                  "backend eager; frames returned as blank images of the right size",
                  "host copies: counted with compile off only (dynamo does not trace under the counting dispatch mode)"]
    elif (arch.name, resolution, frames) == GOAL_CASE:
        lines.append(f"goal (issue 24): default preset cold <= {GOAL_S['cold']:.0f} s, warm <= {GOAL_S['warm']:.0f} s")
    return lines


def table(report: CheckReport) -> str:
    stages = [stage for stage in STAGES if stage != "total"]
    copies = any(run.host_copies is not None for run in report.runs)
    head = (["preset", "compile", "cache", "wall s"] + [f"{stage} s" for stage in stages]
            + ["floor s", "wall / floor", "peak GPU MiB", "peak RSS MiB"]
            + (["host copies by stage (to device / to host)"] if copies else []))
    lines = [f"gpu-check {report.mode}: {report.arch} at {report.resolution} px, {report.frames} frames, bf16, "
             f"{report.device}; floor at {report.peak_gpu} {report.peak_tflops:.0f} TFLOP/s",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in report.runs:
        cells = [run.preset, run.compile, run.cache, f"{run.wall_s:.2f}"]
        cells += [f"{run.stages_s[stage]:.2f}" for stage in stages]
        cells += [f"{run.floor_s:.3g}", f"{run.over_floor:.1f}x",
                  "n/a" if run.peak_gpu_mib is None else f"{run.peak_gpu_mib:.0f}", f"{run.peak_rss_mib:.0f}"]
        if copies:
            cells.append(", ".join(f"{stage} {'/'.join(str(n) for n in counts.values())}"
                                   for stage, counts in run.host_copies.items()) if run.host_copies else "not counted")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"sync check (cold {report.sync.get('preset')} morph): first sync {report.sync.get('first_sync')} "
              f"({report.sync.get('how')})"]
    if report.compile_stats:
        c = report.compile_stats
        lines.append(f"compile: {c['unique_graphs']} graphs, {c['frames_ok']} of {c['frames_total']} frames compiled, "
                     f"recompile limit ({c['recompile_limit']}) hit {c['recompile_limit_hits']} times "
                     "(past it, blocks run eager)")
    prof = report.profile
    idle = "n/a" if prof.get("gpu_idle_fraction") is None else f"{prof['gpu_idle_fraction']:.1%}"
    lines += [f"profiler (warm {prof.get('preset')} morph, {prof.get('wall_s')} s): GPU idle fraction {idle}; top "
              f"{prof.get('what')}:"]
    lines += [f"  {item['ms']:10.2f} ms {item['share']:6.1%} x{item['calls']:<5} {item['name']}"
              for item in prof.get("top", [])]
    lines += [""] + goal_lines(report) + [f"note: {line}" for line in report.notes]
    return "\n".join(lines)


def goal_lines(report: CheckReport) -> list[str]:
    """Issue 24's verdict per default-preset morph, where this run is the goal's case on a GPU."""
    if report.mode != "real" or (report.arch, report.resolution, report.frames) != GOAL_CASE:
        return []
    return [f"goal: default compile {run.compile} {run.cache} {run.wall_s:.2f} s <= {GOAL_S[run.cache]:.0f} s: "
            + ("met" if run.wall_s <= GOAL_S[run.cache] else "MISSED")
            for run in report.runs if run.preset == "default" and run.cache in GOAL_S]


def write_json(report: CheckReport, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / time.strftime("gpu-check-%Y%m%dT%H%M%SZ.json", time.gmtime())
    path.write_text(json.dumps(report.to_json(), indent=1))
    return path


# ---------------------------------------------------------------------------- pipelines
def real_pipeline(arch: Architecture, model_dir: Path, target: Target) -> DiffMorpherPipeline:
    """The random-weight folder (written once, reused), loaded as a worker loads it."""
    started = time.perf_counter()
    folder = write_random_model(arch, model_dir)
    pipe = DiffMorpherPipeline.from_pretrained(folder, device=target.device, dtype="bfloat16",
                                               lpips_weights=LPIPS_WEIGHTS if LPIPS_WEIGHTS.is_file() else None)
    print(f"loaded {folder} on {target.device} in {time.perf_counter() - started:.1f} s", flush=True)
    return pipe


def shape_only_frames(images: torch.Tensor) -> list[Image.Image]:
    """Fake mode's stand-in for preprocess.tensor_to_images: blank frames of the tensor's size
    (the real function reads pixel values, which a fake tensor does not have)."""
    return [Image.new("RGB", (images.shape[-1], images.shape[-2])) for _ in range(images.shape[0])]


def run(args: argparse.Namespace) -> CheckReport:
    target = Target.detect(args.fake)
    arch = ARCHITECTURES[args.arch]
    plan = CheckPlan(arch, args.frames, args.resolution or (FAKE_RESOLUTION if target.fake else arch.resolution),
                     _choices("--presets", args.presets, PRESETS_CHECKED),
                     _choices("--compile", args.compile, COMPILE_CHECKED))
    if target.fake:
        from .fake_cuda import fake_cuda, fake_models

        with fake_cuda() as mode, _patched(pipeline_module, "tensor_to_images", shape_only_frames):
            _no_constant_propagation(mode)
            pipe = DiffMorpherPipeline(fake_models(arch.name, torch.bfloat16, latent_size=plan.resolution // 8), None)
            return check(pipe, target, plan, CopyCounter(pipe))
    pipe = real_pipeline(arch, args.model_dir or REPO_ROOT / ".cache" / "sized-models" / arch.name, target)
    return check(pipe, target, plan, CopyCounter())


def _choices(option: str, value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(item for item in value.split(",") if item)
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        raise SystemExit(f"{option} takes a comma-separated subset of {','.join(allowed)}, got {value!r}")
    return chosen


def _no_constant_propagation(mode: Any) -> None:
    """FakeTensorMode keeps the value of a one-element tensor made from Python numbers
    (`torch.tensor([alpha])` in batching.start_latents) and computes later ops on it for real;
    under inference mode its `.to("cuda")` is then a real copy to a device that is not there.
    The morph runs under inference mode, so this mode keeps no such values."""
    mode.may_turn_const = lambda tensor: False


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="sd21-base")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--resolution", type=int,
                        help=f"default: the architecture's native size ({FAKE_RESOLUTION} with --fake)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--model-dir", type=Path, help="the random-weight folder (default .cache/sized-models/<arch>)")
    parser.add_argument("--presets", default=",".join(PRESETS_CHECKED), help="comma-separated presets")
    parser.add_argument("--compile", default=",".join(COMPILE_CHECKED), help="comma-separated: off, on")
    parser.add_argument("--fake", action="store_true", help="fake CUDA tensors, no GPU (what CI runs)")
    args = parser.parse_args(argv)
    report = run(args)
    path = write_json(report, args.out)
    print(table(report))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
