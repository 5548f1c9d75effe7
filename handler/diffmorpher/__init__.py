"""DiffMorpher core: smooth image morphing with diffusion models (Zhang et al., CVPR 2024).

Importable and testable without TorchServe; the TorchServe handler is a thin adapter over it.
"""

from .config import ConfigError, MorphConfig, OutputOptions
from .interrupt import MorphStopped, StopCheck, StopReason
from .results import MorphResult, ProgressCallback, ProgressEvent

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
