"""DiffMorpher core: smooth image morphing with diffusion models (Zhang et al., CVPR 2024).

Importable and testable without TorchServe; the TorchServe handler is a thin adapter over it.
The options (`diffmorpher.config`) and stop conditions (`diffmorpher.interrupt`) are standard
library only, so torch-free processes (the web page, the load generator, clients) can read the
one source of truth for options; what needs torch (`MorphResult`, ...) is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import ConfigError, MorphConfig, OutputOptions
from .interrupt import MorphStopped, StopCheck, StopReason

_LAZY = {"MorphResult": "results", "ProgressCallback": "results", "ProgressEvent": "results"}

__all__ = [
    "ConfigError",
    "MorphConfig",
    "OutputOptions",
    "MorphStopped",
    "StopCheck",
    "StopReason",
    "MorphResult",
    "ProgressCallback",
    "ProgressEvent",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
