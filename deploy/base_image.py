"""A stand-in for the Dockerfile's base image, made locally when no registry serves it.

deploy/image/Dockerfile starts `FROM python:3.11-slim-bookworm` and must stay buildable unchanged
with Docker where a registry serves that image. Here no registry is reachable, so this module
makes an image with the same name from Debian bookworm itself (debootstrap from the Debian
mirror, which is reachable) holding what the Dockerfile uses of python:3.11-slim-bookworm:
Python 3.11 as `python`, `pip` on PATH and allowed to install system-wide, apt, useradd, and
CA certificates that include this host's locally added ones (so pip and apt inside a build
reach the package index through this network's TLS proxy).

The image is made only when the name is absent, or when it is a stand-in of an older recipe
(its label RECIPE_LABEL holds the recipe's hash); a real python:3.11-slim-bookworm is never
replaced. podman's storage persists on this machine, so the base is made once (minutes) and
every later build starts from it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.podman import Podman

BASE_NAME = "docker.io/library/python:3.11-slim-bookworm"
RECIPE_LABEL = "org.diffmorpher.stand-in-recipe"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
# python:3.11-slim-bookworm's environment, as far as the Dockerfile depends on it.
IMAGE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# Run inside the new root after debootstrap: `python` and `pip` as the official image names
# them; pip may install system-wide (PEP 668's marker removed, as the official image has none);
# the host's CA certificates trusted; apt's lists and package cache emptied (the official image
# ships none; the Dockerfile runs apt-get update itself).
SETUP_SCRIPT = """set -eu
ln -sf /usr/bin/python3 /usr/local/bin/python
ln -sf /usr/bin/pip3 /usr/local/bin/pip
rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
update-ca-certificates >/dev/null
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb
python --version
pip --version
"""


@dataclass(frozen=True)
class BaseRecipe:
    """What the stand-in is made of; its hash (with the host's CA certificates) labels the image."""

    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    variant: str = "minbase"
    packages: tuple[str, ...] = ("python3", "python3-pip", "ca-certificates")
    setup_script: str = SETUP_SCRIPT
    env: dict[str, str] = field(default_factory=lambda: dict(IMAGE_ENV))

    def host_certificates(self) -> list[Path]:
        return sorted(HOST_CA_DIR.glob("*.crt")) if HOST_CA_DIR.is_dir() else []

    def digest(self) -> str:
        text = repr((self.suite, self.mirror, self.variant, self.packages, self.setup_script, sorted(self.env.items())))
        hasher = hashlib.sha256(text.encode())
        for certificate in self.host_certificates():
            hasher.update(certificate.name.encode() + certificate.read_bytes())
        return hasher.hexdigest()[:16]


def base_state(podman: Podman, recipe: BaseRecipe, name: str = BASE_NAME) -> str:
    """'current' (our stand-in of this recipe), 'stale' (our stand-in of another recipe),
    'foreign' (an image of that name not made here: a real one), or 'absent'."""
    if not podman.image_exists(name):
        return "absent"
    label = podman.image_label(name, RECIPE_LABEL)
    if label is None:
        return "foreign"
    return "current" if label == recipe.digest() else "stale"


def make_rootfs(recipe: BaseRecipe, root: Path, log: Path) -> None:
    """debootstrap the recipe into `root`, copy the host's CA certificates in, run the setup."""
    with log.open("ab") as out:
        command = ["debootstrap", f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}",
                   recipe.suite, str(root), recipe.mirror]
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT)
        ca_dir = root / HOST_CA_DIR.relative_to("/")
        ca_dir.mkdir(parents=True, exist_ok=True)
        for certificate in recipe.host_certificates():
            shutil.copyfile(certificate, ca_dir / certificate.name)
        subprocess.run(["chroot", str(root), "/bin/sh", "-c", recipe.setup_script], check=True, stdout=out,
                       stderr=subprocess.STDOUT)


def import_rootfs(podman: Podman, recipe: BaseRecipe, root: Path, name: str) -> None:
    """`podman import` of the folder as `name`, with the recipe's label and the image's env."""
    changes = [f"LABEL {RECIPE_LABEL}={recipe.digest()}", 'CMD ["python3"]']
    changes += [f"ENV {key}={value}" for key, value in recipe.env.items()]
    tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
    try:
        args = [arg for change in changes for arg in ("--change", change)]
        subprocess.run(["podman", "import", *args, "-", name], env=podman.env, stdin=tar.stdout, check=True,
                       stdout=subprocess.DEVNULL)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0:
            raise RuntimeError(f"tar of {root} failed ({tar.returncode})")


def ensure_base(podman: Podman, recipe: BaseRecipe = BaseRecipe(), name: str = BASE_NAME,
                workdir: Path = Path("/var/tmp")) -> str:
    """Make the stand-in when `name` is absent or a stale stand-in. Returns what was found
    ('current', 'foreign') or 'made (N s)'."""
    state = base_state(podman, recipe, name)
    if state in ("current", "foreign"):
        return state
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="diffmorpher-base-", dir=workdir) as tmp:
        root = Path(tmp) / "root"
        log = Path(tmp) / "debootstrap.log"
        try:
            make_rootfs(recipe, root, log)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"making the stand-in base failed: {error}\n{log.read_text()[-3000:]}") from error
        import_rootfs(podman, recipe, root, name)
    return f"made ({time.monotonic() - start:.0f} s)"
