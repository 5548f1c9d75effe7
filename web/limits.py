"""What the page may ask for, read from the service's own sources of truth (never copied here).

- Option names, defaults and presets: `MorphConfig` (`diffmorpher.config`, installed with the
  project). The core package imports its options without torch, so the web process stays
  torch-free (tested).
- The image count and frame limit: `morph_protocol.limits`, which the service's request parser
  and option checks use.
- The upload size: `max_request_size` of the config.properties TorchServe and the guard run
  with (the guard's gateway refuses larger requests with RESOURCE_EXHAUSTED), read by
  `morph_protocol.properties`.
- Prompts for the demo images: assets/demo/prompts.json, as `make demo` uses them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from morph_protocol import limits as service_limits
from morph_protocol.formats import FRAMES_ZIP, GIF, MP4, WEBP
from morph_protocol.properties import max_request_bytes, read_properties

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TS_CONFIG = REPO_ROOT / "config.properties"
DEMO_PROMPTS = REPO_ROOT / "assets" / "demo" / "prompts.json"

# Options the page sets in its main form, and those that belong to the server (refused when a
# request sends them): neither goes into the "advanced" fold.
MAIN_OPTIONS = ("num_frames", "seed")
SERVER_OPTIONS = ("device", "dtype")
# Options the page sets with a switch of their own in the settings (not in the "advanced" fold).
SWITCH_OPTIONS = ("shared_lora",)
# The page's preset when the user picks none: a shared CPU server answers it in seconds.
DEFAULT_PRESET = "fast"
# One morph, every encoding the page offers: the GIF plays, MP4 and ZIP are downloads.
FORMATS = [GIF, MP4, FRAMES_ZIP]
# Encodings a person may add to those (the form's "format" list): a WebP download.
CHOSEN_FORMATS = [WEBP]


def load_morph_config() -> ModuleType:
    """`diffmorpher.config`, with a message saying how to run when handler/ is not importable."""
    try:
        return importlib.import_module("diffmorpher.config")
    except ModuleNotFoundError as error:
        raise RuntimeError(
            "cannot import the morph options (diffmorpher.config): install the project "
            "(make setup) or run the page from its venv"
        ) from error


def _option_kind(annotation: str) -> tuple[str, bool]:
    """('int' | 'float' | 'bool' | 'str', optional) from a field's annotation text."""
    parts = [part.strip() for part in str(annotation).split("|")]
    optional = "None" in parts
    kinds = [part for part in parts if part != "None"]
    return (kinds[0] if kinds else "str"), optional


def _lowest_valid(config: ModuleType, name: str, candidates: range) -> int:
    """The smallest value of `name` MorphConfig accepts (its validate() holds the bound)."""
    for value in candidates:
        try:
            config.MorphConfig(**{name: value})
            return value
        except config.ConfigError:
            continue
    raise RuntimeError(f"MorphConfig accepts no {name} in {candidates}")


@dataclass(frozen=True)
class PageLimits:
    """Everything the page's form needs: bounds, defaults, presets and the advanced options."""

    max_request_bytes: int
    max_images: int = service_limits.MAX_IMAGES
    min_images: int = service_limits.MIN_IMAGES
    # One image and several prompts: the service makes the other endpoints.
    min_one_image_prompts: int = service_limits.MIN_ONE_IMAGE_PROMPTS
    max_one_image_prompts: int = service_limits.MAX_ONE_IMAGE_PROMPTS
    min_frames: int = 2
    max_frames: int = service_limits.MAX_FRAMES
    default_frames: int = 16
    default_seed: int = 0
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_preset: str = DEFAULT_PRESET
    options: list[dict[str, Any]] = field(default_factory=list)
    known_prompts: dict[str, str] = field(default_factory=dict)
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    chosen_formats: list[str] = field(default_factory=lambda: list(CHOSEN_FORMATS))
    # The WebP choice's quality field: bounds from morph_protocol.limits, default OutputOptions'.
    webp_quality: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_max_request_bytes(ts_config: Path) -> int:
    """`max_request_size` of the service's config.properties."""
    return max_request_bytes(read_properties(ts_config))


def read_known_prompts(path: Path = DEMO_PROMPTS) -> dict[str, str]:
    try:
        prompts = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(name): str(prompt) for name, prompt in prompts.items()} if isinstance(prompts, dict) else {}


def page_limits(ts_config: Path = DEFAULT_TS_CONFIG) -> PageLimits:
    config = load_morph_config()
    defaults = config.MorphConfig()
    options = []
    for spec in dataclasses.fields(config.MorphConfig):
        if spec.name in MAIN_OPTIONS or spec.name in SERVER_OPTIONS or spec.name in SWITCH_OPTIONS:
            continue
        kind, optional = _option_kind(spec.type)
        entry: dict[str, Any] = {
            "name": spec.name, "kind": kind, "optional": optional, "default": getattr(defaults, spec.name),
        }
        if spec.name == "perceptual_metric":
            entry["choices"] = list(config.PERCEPTUAL_METRICS)
        options.append(entry)
    return PageLimits(
        max_request_bytes=read_max_request_bytes(ts_config),
        min_frames=_lowest_valid(config, "num_frames", range(0, service_limits.MAX_FRAMES + 1)),
        max_frames=service_limits.MAX_FRAMES,
        default_frames=defaults.num_frames,
        default_seed=defaults.seed,
        presets={name: dict(values) for name, values in config.PRESETS.items()},
        default_preset=DEFAULT_PRESET if DEFAULT_PRESET in config.PRESETS else next(iter(config.PRESETS)),
        options=options,
        known_prompts=read_known_prompts(),
        webp_quality={"min": service_limits.MIN_WEBP_QUALITY, "max": service_limits.MAX_WEBP_QUALITY,
                      "default": config.OutputOptions().webp_quality},
    )
