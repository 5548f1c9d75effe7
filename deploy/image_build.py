"""`make image`: the serving image built here with podman (`python -m deploy.image_build`).

Steps: podman, runc and debootstrap installed when missing (deploy/podman.py); the Dockerfile's
base made locally when no registry serves it (deploy/base_image.py); then deploy/image/Dockerfile
built unchanged. What is specific to this machine is on podman's command line only, so the same
Dockerfile builds with Docker/BuildKit where a registry serves the base:
- the host's local package indices (pip's own configuration: extra-index-url and find-links
  folders, e.g. torch's CUDA wheels) are bind-mounted read-only into the build with a pip.conf
  naming them, so the large wheels are read from disk, not downloaded;
- pip's wheel and HTTP cache is the Dockerfile's `RUN --mount=type=cache` (podman keeps it
  across builds, as BuildKit does), and unchanged layers come from podman's layer cache.
Prints the image's size and the build time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from deploy.base_image import BaseRecipe, ensure_base
from deploy.podman import IMAGE_DIR, Podman, ensure_installed

# The one place the image's tag is written (Makefile, deploy/image_smoke.py and tests read it here).
IMAGE = "localhost/diffmorpher-serving:local"
REPO_ROOT = IMAGE_DIR.parent.parent
DOCKERFILE = IMAGE_DIR / "Dockerfile"
IGNOREFILE = IMAGE_DIR / "Dockerfile.dockerignore"


@dataclass(frozen=True)
class LocalIndex:
    """pip's local package sources of this host: index URLs (file://) and find-links folders
    that exist, and the folders a build must see for them."""

    index_urls: tuple[str, ...]
    find_links: tuple[str, ...]

    @property
    def mounts(self) -> list[Path]:
        """The folders to bind-mount: an index's root (its pages link to ../../files/) and each
        find-links folder."""
        roots = [Path(urlparse(url).path).parent for url in self.index_urls]
        return sorted({*roots, *(Path(folder) for folder in self.find_links)})

    def pip_conf(self) -> str:
        lines = ["[global]"]
        if self.index_urls:
            lines.append(f"extra-index-url = {' '.join(self.index_urls)}")
        if self.find_links:
            lines.append(f"find-links = {' '.join(self.find_links)}")
        return "\n".join(lines) + "\n"


def host_local_index(python: str = sys.executable) -> LocalIndex:
    """The local (on-disk) sources among pip's configuration on this host (`pip config list`:
    files and PIP_* environment); remote ones are left to the build's own network."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    index_urls: list[str] = []
    find_links: list[str] = []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        values = value.strip().strip("'\"").split()
        if name in ("index-url", "extra-index-url"):
            index_urls += [v for v in values if v.startswith("file://") and Path(urlparse(v).path).is_dir()]
        elif name == "find-links":
            find_links += [v for v in values if v.startswith("/") and Path(v).is_dir()]
    return LocalIndex(tuple(dict.fromkeys(index_urls)), tuple(dict.fromkeys(find_links)))


def build_command(image: str, index: LocalIndex, pip_conf: Path) -> list[str]:
    """`podman build` of the Dockerfile from the repository root, with the host's indices."""
    command = ["build", "--layers", "--file", str(DOCKERFILE), "--ignorefile", str(IGNOREFILE), "--tag", image]
    if index.mounts:
        command += ["--volume", f"{pip_conf}:/etc/pip.conf:ro"]
        command += [arg for folder in index.mounts for arg in ("--volume", f"{folder}:{folder}:ro")]
    return [*command, str(REPO_ROOT)]


@dataclass(frozen=True)
class BuildResult:
    image: str
    seconds: float
    size_bytes: int
    base: str

    def summary(self) -> str:
        return (f"image {self.image}: {self.size_bytes / 1e9:.2f} GB, built in {self.seconds:.0f} s "
                f"(base {self.base})")


def build_image(image: str = IMAGE, log: Path | None = None, podman: Podman = Podman()) -> BuildResult:
    """Everything `make image` does; podman's build output goes to `log` (else to stdout)."""
    start = time.monotonic()
    ensure_installed()
    base = ensure_base(podman, BaseRecipe())
    index = host_local_index()
    with tempfile.TemporaryDirectory(prefix="diffmorpher-build-") as tmp:
        pip_conf = Path(tmp) / "pip.conf"
        pip_conf.write_text(index.pip_conf())
        command = ["podman", *build_command(image, index, pip_conf)]
        if log is None:
            subprocess.run(command, env=podman.env, check=True)
        else:
            with log.open("ab") as out:
                result = subprocess.run(command, env=podman.env, stdout=out, stderr=subprocess.STDOUT)
            if result.returncode != 0:
                raise RuntimeError(f"podman build failed ({result.returncode}):\n{log.read_text()[-4000:]}")
    return BuildResult(image, time.monotonic() - start, podman.image_size(image), base)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.image_build", description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=IMAGE, help=f"tag to build (default {IMAGE})")
    parser.add_argument("--print-image", action="store_true", help="print the image tag and exit")
    args = parser.parse_args(argv)
    if args.print_image:
        print(args.image)
        return 0
    print(build_image(args.image).summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
