"""Fake-GPU runs: the core on *fake* CUDA tensors, and a count of its host<->device transfers.

PyTorch's FakeTensorMode runs every op for its metadata only (shape, dtype, device), raises on a
device mismatch (a CPU tensor meeting a CUDA one) and on reading a value back to the host
(`.item()`, `int(t)`, `bool(t)`). Models built inside the mode hold fake weights (no memory), so
real-size architectures (checkpoints/architectures.py) run in seconds on a machine with no GPU.

API (small on purpose; `tests/test_fake_cuda.py`, `tests/test_host_copies.py` and the fake mode of
`make gpu-check` use it):

- `fake_cuda()`: a context manager entering FakeTensorMode with the CPU as the default device,
  as in a real worker: build models on the (fake) CPU and move them with `.to("cuda")`, or pass
  an explicit device. Yields the mode.
- `fake_models(size, dtype, device="cuda", latent_size=None)`: fake `MorphModels` of the
  embedded model's configs (`"embedded"`), `"sd21-base"` or `"sdxl-base"`, built on the CPU
  inside the mode and moved to `device`. Call it inside `fake_cuda()`.
- `fake_lpips(device="cuda")`: the reschedule's LPIPS-AlexNet (checkout weights) on the fake device.
- `TransferCounter`: a TorchDispatchMode that records every host->device copy (an op with a CPU
  tensor among its inputs and a CUDA tensor among its outputs) and every device->host read
  (`.item()` / `aten._local_scalar_dense`, or a CUDA input with a CPU output), each with the
  current stage label and the Python site that asked for it. Enter it *inside* `fake_cuda()`.
  Label stages with `counter.stage("name")`, or a module's forward with `counter.label(module,
  "name")`; read `counter.host_to_device(stage)`, `counter.device_to_host(stage)`, and
  `counter.report()` for a failure message. `TransferCounter(answer_reads=x)` answers a read of
  a device value with x instead of failing, so a run that reads a few numbers on purpose (the
  reschedule's distances) goes on; the read is still recorded.

Typical use (tests/test_host_copies.py):

    with fake_cuda():
        models = fake_models("embedded", torch.bfloat16)
        pipe = DiffMorpherPipeline(models, fake_lpips())
        with TransferCounter(answer_reads=0.1) as counter:
            counter.label(models.unet, "unet")
            pipe(images, prompts, config)
    assert counter.host_to_device("unet") == [], counter.report()
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from safetensors.torch import load as load_safetensors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffmorpher.conditioning import StableDiffusionConditioner, StableDiffusionXLConditioner, TextConditioner
from diffmorpher.ddim import NoiseSchedule
from diffmorpher.models import MorphModels, vae_dtype
from diffmorpher.perceptual import LpipsDistance, build_lpips_alex, checkout_cache_path

from checkpoints.architectures import ARCHITECTURES, SCHEDULER

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO_ROOT / "models" / "tiny-shapes-sd"  # the same folder as tests.conftest.EMBEDDED_MODEL
SIZES = ("embedded", "sd21-base", "sdxl-base")

HOST_TO_DEVICE = "host->device"
DEVICE_TO_HOST = "device->host"
UNLABELLED = "-"


# What the fake device reports as free memory (an H100/H200-class card with its weights loaded).
FAKE_FREE_BYTES = 64 << 30


@contextlib.contextmanager
def _fake_driver(free_bytes: int) -> Iterator[None]:
    """The few driver calls the core makes outside tensors, answered as a card would: the free
    memory the automatic frame batch reads (`torch.cuda.mem_get_info`, the allocator's figures)
    and the stage timings' `torch.cuda.synchronize` (nothing to wait for). Without a driver
    each would raise "Found no NVIDIA driver"."""
    cuda = torch.cuda
    stand_ins = {
        "mem_get_info": lambda device=None: (free_bytes, free_bytes * 2),
        "memory_reserved": lambda device=None: 0,
        "memory_allocated": lambda device=None: 0,
        "synchronize": lambda device=None: None,
    }
    real = {name: getattr(cuda, name) for name in stand_ins}
    for name, stand_in in stand_ins.items():
        setattr(cuda, name, stand_in)
    try:
        yield
    finally:
        for name, function in real.items():
            setattr(cuda, name, function)


@contextlib.contextmanager
def fake_cuda(free_bytes: int = FAKE_FREE_BYTES) -> Iterator[FakeTensorMode]:
    """Fake tensors, the CPU still the default device, and a fake driver reporting `free_bytes`
    free (_fake_driver). peft moves a new adapter to its base
    layer's device with Module.to, which swaps parameters, and so does `model.to("cuda")`; a
    fake parameter the mode holds a weak reference to cannot be swapped, so for the duration
    swapping falls back to `.data` assignment plus the fake tensor's device (`.data` alone keeps
    a fake tensor's device; restored on exit). And the mode keeps a one-element tensor made
    from Python data (`torch.tensor([0.5])`) as a real constant and runs real ops on it, so
    moving one to "cuda" would ask for a driver: `_ConstantsStayOnHost` makes such a tensor
    plain fake when an op would take it to the device (constants that stay on the host keep
    their values, e.g. AdamW's step count)."""
    real_swap = torch.utils.swap_tensors

    def swap_or_assign(t1: torch.Tensor, t2: torch.Tensor) -> None:
        try:
            real_swap(t1, t2)
        except RuntimeError:
            t1.data = t2.data
            if isinstance(t1, FakeTensor) and isinstance(t2, FakeTensor):
                t1.fake_device = t2.fake_device

    torch.utils.swap_tensors = swap_or_assign
    try:
        with _fake_driver(free_bytes), FakeTensorMode(allow_non_fake_inputs=True) as mode, _ConstantsStayOnHost():
            yield mode
    finally:
        torch.utils.swap_tensors = real_swap


class _ConstantsStayOnHost(TorchDispatchMode):
    """Drops the real value behind a fake host constant when an op involves the device (a
    device input, or a `device=` argument that is not the CPU), so the fake mode computes
    that op's metadata instead of running it for real on a GPU it does not have."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, FakeTensor)]
        target = kwargs.get("device")
        if any(t.device.type != "cpu" for t in tensors) or (target is not None and torch.device(target).type != "cpu"):
            for tensor in tensors:
                if tensor.constant is not None:
                    tensor.constant = None
        return func(*args, **kwargs)


def fake_models(size: str, dtype: torch.dtype, device: str = "cuda", latent_size: int | None = None,
                scheduler: DDIMScheduler | None = None) -> MorphModels:
    """MorphModels of `size` (SIZES) in `dtype`, built on the fake CPU and moved to `device`.
    `latent_size` overrides the UNet's sample size (its native resolution / 8). Tokenizers are
    the embedded model's (CLIP's vocabulary; only the sizes matter here). The scheduler's
    numbers are read outside the mode's tensors, as when models load: pass a real `scheduler`
    built outside the mode, or the architecture's DDIM config is used."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if scheduler is None:
        config = (DDIMScheduler.load_config(EMBEDDED_MODEL, subfolder="scheduler") if size == "embedded"
                  else ARCHITECTURES[size].scheduler if size in ARCHITECTURES else SCHEDULER)
        with _real_tensors():
            scheduler = DDIMScheduler.from_config(config)
    with _real_tensors():
        schedule = NoiseSchedule.from_scheduler(scheduler)
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL, subfolder="tokenizer")
    target = torch.device(device)
    if size == "embedded":
        unet_config = dict(UNet2DConditionModel.load_config(EMBEDDED_MODEL, subfolder="unet"))
        vae_config = dict(AutoencoderKL.load_config(EMBEDDED_MODEL, subfolder="vae"))
        text_configs = [CLIPTextConfig.from_pretrained(EMBEDDED_MODEL, subfolder="text_encoder").to_dict()]
    else:
        arch = ARCHITECTURES[size]
        unet_config, vae_config, text_configs = dict(arch.unet), dict(arch.vae), list(arch.text_encoders)
    if latent_size is not None:
        unet_config["sample_size"] = latent_size
    unet = _built(dtype, lambda: UNet2DConditionModel.from_config(unet_config))
    vae = _built(vae_dtype(vae_config, dtype), lambda: AutoencoderKL.from_config(vae_config))
    conditioner: TextConditioner
    if size == "sdxl-base":
        encoders = (_built(dtype, lambda: CLIPTextModel(CLIPTextConfig(**text_configs[0]))),
                    _built(dtype, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_configs[1]))))
        tokenizer_2 = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL, subfolder="tokenizer", pad_token="!")
        conditioner = StableDiffusionXLConditioner((tokenizer, tokenizer_2), encoders, target, dtype)
    else:
        encoders = (_built(dtype, lambda: CLIPTextModel(CLIPTextConfig(**text_configs[0]))),)
        conditioner = StableDiffusionConditioner(tokenizer, encoders[0], target, dtype)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
        module.eval()
        module.to(target)
    return MorphModels(unet, vae, conditioner, scheduler, target, dtype, f"fake-{size}", schedule)


def fake_lpips(device: str = "cuda") -> LpipsDistance:
    """LPIPS-AlexNet (the reschedule's distance) from the checkout's weights (.cache/lpips,
    `make setup` prepares them) on the fake `device`. Its weights are read and checked outside
    the mode (the check reads values), then moved in. Call it inside `fake_cuda()`."""
    path = checkout_cache_path()
    if path is None or not path.is_file():
        raise FileNotFoundError("no LPIPS weights in .cache/lpips: python -m export.lpips_weights prepare")
    with _real_tensors():
        model = build_lpips_alex(load_safetensors(path.read_bytes()))
    return LpipsDistance(model, str(path), torch.device(device), "fake")


def _built(dtype: torch.dtype, build: Any) -> Any:
    """build() with `dtype` as the default dtype (restored after), so fake weights are made in
    the run dtype directly."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build()
    finally:
        torch.set_default_dtype(default)


@contextlib.contextmanager
def _real_tensors() -> Iterator[None]:
    """Leave any active fake mode for a block (the scheduler's tables are read as numbers)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


@dataclass(frozen=True)
class Transfer:
    """One copy between host and device: its direction, the aten op, the stage label at the
    time, the project source line that asked for it, and the output shape."""

    direction: str
    op: str
    stage: str
    site: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.direction} {self.op} {list(self.shape)} in {self.stage} at {self.site}"


class TransferCounter(TorchDispatchMode):
    """Records host<->device transfers, by stage (see the module docstring)."""

    def __init__(self, answer_reads: float | None = None) -> None:
        """`answer_reads`: answer a read of one value (`.item()`, `.tolist()`, `float(t)`) with
        this number instead of failing (a fake tensor has no data), so a run that reads a few
        numbers on purpose (the reschedule's distances) goes on; the read is still recorded."""
        super().__init__()
        self.answer_reads = answer_reads
        self.transfers: list[Transfer] = []
        self.stages: list[str] = []
        self.calls: dict[str, int] = {}  # label -> times a labelled module ran

    @property
    def current(self) -> str:
        return "/".join(self.stages) if self.stages else UNLABELLED

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Label the transfers of a block (nested labels join with "/")."""
        self.stages.append(name)
        try:
            yield
        finally:
            self.stages.pop()

    def label(self, module: torch.nn.Module, name: str) -> list[torch.utils.hooks.RemovableHandle]:
        """Label every forward of `module` (e.g. the UNet), and count its calls; returns the hook
        handles (call `.remove()` on each)."""

        def pre(*_: Any) -> None:
            self.stages.append(name)
            self.calls[name] = self.calls.get(name, 0) + 1

        def post(*_: Any) -> None:
            self.stages.pop()

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]

    def host_to_device(self, stage: str | None = None) -> list[Transfer]:
        """Host->device copies; with `stage`, those whose label path contains it."""
        return self._select(HOST_TO_DEVICE, stage)

    def device_to_host(self, stage: str | None = None) -> list[Transfer]:
        return self._select(DEVICE_TO_HOST, stage)

    def _select(self, direction: str, stage: str | None) -> list[Transfer]:
        return [t for t in self.transfers
                if t.direction == direction and (stage is None or stage in t.stage.split("/"))]

    def report(self, transfers: list[Transfer] | None = None, limit: int = 40) -> str:
        """One line per transfer (the first `limit`), for an assertion message."""
        chosen = self.transfers if transfers is None else transfers
        lines = [str(t) for t in chosen[:limit]]
        if len(chosen) > limit:
            lines.append(f"... and {len(chosen) - limit} more")
        return "\n".join(lines)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in _READS:
            if args[0].device.type != "cpu":  # a CPU tensor's value is on the host already
                self._record(DEVICE_TO_HOST, func, ())
            if self.answer_reads is not None:
                dtype = args[0].dtype
                if dtype == torch.bool:
                    return bool(self.answer_reads)
                return float(self.answer_reads) if dtype.is_floating_point else int(self.answer_reads)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func is torch.ops.aten.copy_.default:  # copy_(dst, src): the destination is the output
            inputs, outputs = [args[1]] if isinstance(args[1], torch.Tensor) else [], [args[0]]
        in_types = {t.device.type for t in inputs}
        out_types = {t.device.type for t in outputs}
        shape = tuple(outputs[0].shape) if outputs else ()
        if "cpu" in in_types and "cuda" in out_types:
            self._record(HOST_TO_DEVICE, func, shape)
        elif "cuda" in in_types and "cpu" in out_types:
            self._record(DEVICE_TO_HOST, func, shape)
        return out

    def _record(self, direction: str, func: Any, shape: tuple[int, ...]) -> None:
        self.transfers.append(Transfer(direction, str(func.overloadpacket.__name__), self.current, _site(), shape))


# Reading one value to the host: `aten.item` reaches a mode as itself under inference_mode, as
# `_local_scalar_dense` elsewhere.
_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


def _site() -> str:
    """The innermost frame of the project's own code (not torch, not this module)."""
    here = Path(__file__).resolve()
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path == here or REPO_ROOT not in path.parents or ".venv" in path.parts:
            continue
        return f"{path.relative_to(REPO_ROOT)}:{frame.lineno} {frame.name}"
    return "?"
