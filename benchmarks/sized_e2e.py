"""A real-size model through the whole served path: export, serve, one morph through the gateway.

    python -m benchmarks.sized_e2e --arch sd15 [--out DIR]      (make sized-e2e ARCH=sd15)

Writes (or reuses) a random-weight folder of the architecture (benchmarks/sized_model.py),
exports it with external weights, starts TorchServe and the guard on free loopback ports, sends
one morph at the model's native resolution with tiny step counts (1 LoRA step, 2 DDIM steps, 3
frames; the reschedule's measuring pass on) through the gateway with the project's client, and
prints what an operator sizes a deployment by: archive size and export time, time to ready,
the worker's peak RSS, each stage's seconds, and seconds per UNet call derived from them. The
numbers land in `<out>/sized-e2e-<arch>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from client.morph_client import MorphClient
from launcher.archive import MODEL_NAME, export_model
from launcher.torchserve import TorchServeProcess
from morph_protocol.keyfile import TokenSource

from checkpoints.architectures import ARCHITECTURES
from .sized_model import REPO_ROOT, folder_bytes, write_random_model

DEMO = REPO_ROOT / "assets" / "demo"
# The smallest morph that runs every stage: one LoRA step per image (both images in one batch),
# two DDIM steps, three frames, the reschedule's measuring pass on its coarse walk.
OPTIONS: dict[str, Any] = {"lora_steps": 1, "num_inference_steps": 2, "num_frames": 3}
GB = 1e9


@dataclass
class SizedRun:
    arch: str
    resolution: int
    model_bytes: int
    archive_bytes: int
    export_s: float
    ready_s: float
    morph_s: float
    worker_peak_rss_bytes: int
    stages_s: dict[str, float]
    unet_forward_s: float  # inversion seconds per image per step (a batch-1 forward, derived)
    lora_step_s: float  # LoRA seconds per step (forward + backward of both images, derived)
    frames: int
    host: str
    dtype: str = "float32"
    options: dict[str, Any] | None = None  # the morph's options beyond OPTIONS (--option)

    def table(self) -> str:
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.stages_s.items())
        return "\n".join([
            f"{self.arch} at {self.resolution} px, {self.dtype} ({self.host})",
            f"  model folder        {self.model_bytes / GB:.2f} GB (float16 safetensors)",
            f"  archive             {self.archive_bytes / 1e6:.1f} MB (external weights), export {self.export_s:.1f} s",
            f"  time to ready       {self.ready_s:.1f} s (TorchServe start, worker load, guard)",
            f"  worker peak RSS     {self.worker_peak_rss_bytes / GB:.2f} GB",
            f"  morph (client)      {self.morph_s:.1f} s, {self.frames} frames",
            f"  stages              {stages}",
            f"  per UNet call       forward {self.unet_forward_s:.2f} s (batch 1); LoRA step {self.lora_step_s:.2f} s "
            f"(forward + backward of both images)",
        ])


def peak_rss(pid: int) -> int:
    """The process's high-water resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def run(arch_name: str, out: Path, model_dir: Path | None = None, dtype: str = "float32",
        options: dict[str, Any] | None = None) -> SizedRun:
    arch = ARCHITECTURES[arch_name]
    extra = dict(options or {})
    model = write_random_model(arch, model_dir or REPO_ROOT / ".cache" / "sized-models" / arch_name)
    out.mkdir(parents=True, exist_ok=True)
    # The run's archive and server folders live beside the sized models, outside the package
    # tree: a run killed midway must not leave Python-looking folders under benchmarks/.
    scratch = REPO_ROOT / ".cache" / "sized-e2e-runs"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sized-e2e-", dir=scratch) as tmp:
        store = Path(tmp) / "model_store"
        started = time.perf_counter()
        export_model(model, store, "--weights", "external", "--archive-format", "no-archive",
                     "--default", f"dtype={dtype}", quiet=True)
        export_s = time.perf_counter() - started
        # Every core for the one worker (the launcher's default is one thread, for tests that
        # share two cores between several processes).
        threads = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
        server = TorchServeProcess(Path(tmp) / "server", store, archive=MODEL_NAME, env=threads)
        started = time.perf_counter()
        server.start(timeout_s=1800)  # a real-size worker's load on a CPU takes minutes
        try:
            ready_s = time.perf_counter() - started
            images = [(DEMO / name).read_bytes() for name in ("red_circle.png", "blue_triangle.png")]
            prompts = ["a red circle on a white background", "a blue triangle on a white background"]
            started = time.perf_counter()
            with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file)) as client:
                result = client.morph(images, prompts, {**OPTIONS, **extra, "format": "gif"}, deadline_s=3600)
            morph_s = time.perf_counter() - started
            rss = peak_rss(int(result.metadata["worker_pid"]))
        finally:
            server.stop()
        stages = {name: float(seconds) for name, seconds in result.metadata["timings"].items()}
        steps, images_count = OPTIONS["num_inference_steps"], len(images)
        return SizedRun(
            arch=arch_name,
            resolution=int(result.metadata["resolution"]),
            model_bytes=folder_bytes(model),
            archive_bytes=folder_bytes(store / MODEL_NAME),
            export_s=round(export_s, 2),
            ready_s=round(ready_s, 2),
            morph_s=round(morph_s, 2),
            worker_peak_rss_bytes=rss,
            stages_s=stages,
            unet_forward_s=round(stages["inversion"] / (steps * images_count), 3),
            lora_step_s=round(stages["lora"] / OPTIONS["lora_steps"], 3),
            frames=int(result.metadata["num_frames"]),
            host=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
            dtype=dtype,
            options=extra,
        )


def _option_value(raw: str) -> Any:
    """A JSON value (1, true, 0.5), else the text itself."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sized_e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), required=True)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the worker's dtype (bfloat16: half the memory, and on CPUs with AVX512-BF16 "
                             "about 4x fp32's matmul rate; what fits SDXL-base on a 24 GB host)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a morph option on top of the tiny step counts, e.g. frame_batch_size=1 "
                             "(the LoRA fit then holds one image's activations at a time)")
    args = parser.parse_args(argv)
    options = {key: _option_value(value) for key, _, value in (item.partition("=") for item in args.option)}
    sized = run(args.arch, args.out, dtype=args.dtype, options=options)
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    path = args.out / f"sized-e2e-{args.arch}{suffix}.json"
    path.write_text(json.dumps(asdict(sized), indent=2) + "\n")
    print(sized.table())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
