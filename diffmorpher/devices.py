"""Device and dtype selection: the only place that names an accelerator backend."""

from __future__ import annotations

import os

import torch

from .config import AUTO, ConfigError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def select_device(requested: str | None = None) -> torch.device:
    """The requested device, or the best available one: CUDA, then Apple MPS, then CPU."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as error:
            raise ConfigError(f"unknown device {requested!r}: {error}") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} requested but CUDA is not available")
        return device
    if torch.cuda.is_available():  # the current device: the worker's (use_device), else GPU 0
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """The run dtype where none is asked for ("auto"): bfloat16 on a CUDA GPU that supports it
    (fp32's range, so no fp16 overflow in SD's UNet, at tensor-core speed), else float16 there
    (the VAE upcast where its config says: models.vae_dtype); float16 on Apple MPS (its fast
    path); float32 on the CPU, where half precision is slow or unsupported."""
    if device.type == "cuda":  # asks the current device: the worker's own (use_device)
        # Native bf16 only (Ampere and later): before it, bf16 runs emulated, far slower than fp16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The run dtype `name` names on `device` ("auto": default_dtype). Half precision is for
    accelerators; on CPU it is slow or unsupported, so refuse it."""
    if name == AUTO:
        return default_dtype(device)
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("dtype float16 is not supported on CPU; use float32 (or bfloat16)")
    return dtype


def widest_float(device: torch.device) -> torch.dtype:
    """The most precise float dtype the device computes in: float64, except on Apple MPS, which
    has none (float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def device_for_worker(gpu_id: int | str | None) -> torch.device:
    """The device a serving worker should use, given the accelerator index its server assigned.
    TorchServe passes `gpu_id` only to models with `deviceType: gpu` on a GPU host; without
    one the archive asked for the CPU (`deviceType: cpu`), even on a host that has GPUs."""
    if gpu_id is None or str(gpu_id) == "":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"TorchServe assigned GPU {gpu_id}, but this worker sees no CUDA device")
    return torch.device("cuda", int(gpu_id))


def use_device(device: torch.device) -> None:
    """Make `device` this process's current accelerator. A TorchServe worker gets its GPU as
    `gpu_id`; without this, whatever picks the current device (torch.compile's inductor, a
    `torch.device("cuda")` without index, CUDA caches and streams) lands on GPU 0 from every
    worker. Nothing to do on the CPU or MPS (one device)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`: kernels run asynchronously on an accelerator, so a
    wall-clock stage timing is only true once the stage's work has finished. No-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` may still take: the driver's free memory plus what
    this process's caching allocator holds unused (torch.cuda.mem_get_info counts that as
    taken). None where the backend reports no such figure (CPU, MPS)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def worker_threads(configured: int, workers: int, cores: int | None = None) -> int | None:
    """Intra-op torch threads for one of `workers` worker processes on this host: `configured`
    when set (> 0); else None (keep torch's choice) where OMP_NUM_THREADS says; else the cores
    this process may run on, shared out among the workers. Torch's default is every core per
    process: N workers on one CPU host would then oversubscribe the cores N times, and
    oversubscribed threads spin-wait on each other (a morph gets several times slower)."""
    if configured > 0:
        return configured
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    available = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, available // max(1, workers))


_OUT_OF_MEMORY_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Allocation failures of any backend: MemoryError, torch.OutOfMemoryError (CUDA, MPS; a
    RuntimeError subclass) and the CPU allocator's RuntimeError ("can't allocate memory")."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(t in str(error).lower() for t in _OUT_OF_MEMORY_TEXT)


def release_cached_memory(device: torch.device) -> None:
    """After an out-of-memory failure: drop garbage and the accelerator's cached blocks, so the
    next request starts from a clean pool."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
