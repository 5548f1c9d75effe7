"""podman on this machine: installed with apt when missing, run with the project's
containers.conf (deploy/image/containers.conf) so nothing under /etc is edited.

The serving image is built and run with Debian's podman because no Docker daemon runs here. Its
two settings for these machines (runtime runc, ulimits within the host's hard limits) live in
that file and reach podman through CONTAINERS_CONF, for every command this module runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

IMAGE_DIR = Path(__file__).resolve().parent / "image"
CONTAINERS_CONF = IMAGE_DIR / "containers.conf"
# What `make image` needs from Debian: podman itself, runc (the runtime containers.conf names;
# podman only pulls in crun) and debootstrap (the stand-in base image, deploy/base_image.py); each
# package's command has its name.
DEBIAN_PACKAGES = ("podman", "runc", "debootstrap")


class PodmanUnavailable(RuntimeError):
    """podman (or runc, debootstrap) is missing and cannot be installed here: not root, no apt,
    or apt failed. The message says which."""


def ensure_installed() -> None:
    """Install DEBIAN_PACKAGES with apt-get when a tool is missing (as tests/redis_server.py does
    for redis): root only; `apt-get update` is run once when the first install fails."""
    missing = [tool for tool in DEBIAN_PACKAGES if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PodmanUnavailable(f"{', '.join(missing)} not installed and apt-get cannot install it here (not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # With apt's recommends: they bring netavark, aardvark-dns and iptables, podman's bridge
    # network (without them apt may pick the CNI plugins and no iptables).
    install = ["apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise PodmanUnavailable(f"apt-get could not install {' '.join(DEBIAN_PACKAGES)}: {result.stderr[-400:]}")
    still = [tool for tool in DEBIAN_PACKAGES if shutil.which(tool) is None]
    if still:
        raise PodmanUnavailable(f"installed, but not on PATH: {', '.join(still)}")


class PodmanError(RuntimeError):
    """A podman command failed; the message holds its error output."""


@dataclass(frozen=True)
class Podman:
    """The podman command line with the project's containers.conf."""

    conf: Path = CONTAINERS_CONF

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """`podman ARGS`, output captured; with `check`, a failure raises with podman's own
        error output."""
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise PodmanError(f"podman {args[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        return result

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    def inspect_image(self, name: str) -> dict:
        return json.loads(self.run("image", "inspect", name).stdout)[0]

    def image_label(self, name: str, label: str) -> str | None:
        """One label of an image, or None when the image or the label is absent."""
        if not self.image_exists(name):
            return None
        return (self.inspect_image(name).get("Labels") or {}).get(label)

    def image_size(self, name: str) -> int:
        """Bytes on disk (every layer, uncompressed)."""
        return int(self.inspect_image(name)["Size"])
