"""Request profiles (loadtest/profiles.yaml): what one simulated user asks the service for.

Profiles live in a data file so a capacity run can be re-sized without touching code. Loading
only reads YAML and the demo images: the load generator imports nothing of the morph core (no
torch in any Locust process). The options are checked where they are used, by the server: an
unknown name or a bad value is refused as INVALID_ARGUMENT / HTTP 400, and the locustfile ends
the run at the first such answer with the server's message (see `outcomes.refused_for_good`),
instead of sending thousands of them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILES_FILE = Path(__file__).resolve().parent / "profiles.yaml"
DEMO_DIR = REPO_ROOT / "assets" / "demo"


class ProfileError(ValueError):
    """The profiles file or a profile in it is unusable."""


@dataclass(frozen=True)
class Profile:
    name: str
    images: tuple[str, ...]
    options: dict[str, Any]
    stream_share: float = 0.5
    deadline_s: float = 600.0
    p95_target_s: float = 60.0
    description: str = ""
    demo_dir: Path = field(default=DEMO_DIR, compare=False)

    def inputs(self) -> tuple[list[bytes], list[str]]:
        """The encoded images and their prompts (prompts.json maps file name -> prompt)."""
        prompts_file = self.demo_dir / "prompts.json"
        prompts = json.loads(prompts_file.read_text()) if prompts_file.is_file() else {}
        images, texts = [], []
        for name in self.images:
            path = self.demo_dir / name
            if not path.is_file():
                raise ProfileError(f"profile {self.name!r}: image {path} does not exist")
            images.append(path.read_bytes())
            texts.append(str(prompts.get(name, Path(name).stem.replace("_", " "))))
        return images, texts

    def request_options(self, rng: random.Random) -> dict[str, Any]:
        """Options for one request: the profile's, with a fresh seed from the user's generator."""
        return {**self.options, "seed": rng.randrange(2**31)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "images": list(self.images),
            "options": self.options, "stream_share": self.stream_share,
            "deadline_s": self.deadline_s, "p95_target_s": self.p95_target_s,
        }  # fmt: skip


def load_profiles(path: str | Path = PROFILES_FILE) -> dict[str, Profile]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    entries = raw.get("profiles")
    if not isinstance(entries, dict) or not entries:
        raise ProfileError(f"{path}: expected a non-empty `profiles:` mapping")
    profiles = {}
    for name, spec in entries.items():
        try:
            profiles[name] = Profile(
                name=str(name),
                images=tuple(spec["images"]),
                options=dict(spec.get("options") or {}),
                stream_share=float(spec.get("stream_share", 0.5)),
                deadline_s=float(spec.get("deadline_s", 600)),
                p95_target_s=float(spec.get("p95_target_s", 60)),
                description=str(spec.get("description", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ProfileError(f"{path}: profile {name!r} is malformed: {error!r}") from error
        profile = profiles[name]
        if len(profile.images) < 2:
            raise ProfileError(f"{path}: profile {name!r} needs at least 2 images")
        if not 0.0 <= profile.stream_share <= 1.0:
            raise ProfileError(f"{path}: profile {name!r}: stream_share must be in [0, 1]")
        if "seed" in profile.options:
            raise ProfileError(f"{path}: profile {name!r}: seed is drawn per request; remove it")
    return profiles


def load_profile(name: str, path: str | Path = PROFILES_FILE) -> Profile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(f"unknown profile {name!r}; {path} defines {sorted(profiles)}")
    return profiles[name]
