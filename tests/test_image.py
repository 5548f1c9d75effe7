"""The serving image built here with podman and served from a container (`make image`,
`make image-test`), plus the build's host-specific parts checked without podman.

The end-to-end test needs root (podman is installed with apt, as redis and chromium are); it
skips, saying why, only where podman cannot be installed. The first build on a machine makes
the base and installs torch's CUDA wheels (minutes); later ones reuse podman's layer cache.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from deploy.base_image import BaseRecipe
from deploy.image_build import DOCKERFILE, IMAGE, LocalIndex, build_command, build_image, host_local_index
from deploy.image_smoke import DEMO, SmokeConfig, SmokeResult, check_frames, cluster_config, run_smoke
from deploy.podman import PodmanUnavailable, ensure_installed


# ---------------------------------------------------------------------------- without podman
def test_the_dockerfile_has_nothing_podman_specific() -> None:
    """Docker/BuildKit must build it unchanged: the local indices and pip.conf are podman
    arguments, never Dockerfile lines; the cache mount is BuildKit's own syntax."""
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm$", dockerfile, re.M)
    assert "/opt/" not in dockerfile and "pip.conf" not in dockerfile
    assert "RUN --mount=type=cache,target=/root/.cache/pip pip install -c constraints.txt" in dockerfile


def test_the_build_mounts_the_local_indices_read_only(tmp_path: Path) -> None:
    index_root = tmp_path / "pypi"
    (index_root / "simple").mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    index = LocalIndex((f"file://{index_root}/simple",), (str(wheels),))
    assert index.mounts == sorted([index_root, wheels])  # the index's root: its pages link to ../files
    assert index.pip_conf() == f"[global]\nextra-index-url = file://{index_root}/simple\nfind-links = {wheels}\n"
    command = build_command(IMAGE, index, tmp_path / "pip.conf")
    volumes = [command[i + 1] for i, arg in enumerate(command) if arg == "--volume"]
    assert volumes == [f"{tmp_path / 'pip.conf'}:/etc/pip.conf:ro", f"{index_root}:{index_root}:ro", f"{wheels}:{wheels}:ro"]
    assert command[command.index("--tag") + 1] == IMAGE and command[-1] == str(DOCKERFILE.parent.parent.parent)


def test_only_existing_local_sources_of_pips_configuration_are_used(tmp_path: Path) -> None:
    """Remote indices stay the build's own business; a configured folder that is missing is
    left out rather than mounted."""
    (tmp_path / "local" / "simple").mkdir(parents=True)
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nextra-index-url = file://{tmp_path}/local/simple file://{tmp_path}/gone/simple"
                    f" https://example.invalid/simple\nfind-links = {tmp_path} {tmp_path}/absent\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nPIP_CONFIG_FILE={conf} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    index = host_local_index(str(wrapper))
    assert index.index_urls[-1] == f"file://{tmp_path}/local/simple"
    assert f"file://{tmp_path}/gone/simple" not in index.index_urls
    assert "https://example.invalid/simple" not in index.index_urls
    assert str(tmp_path) in index.find_links and f"{tmp_path}/absent" not in index.find_links


def test_the_base_is_remade_when_its_recipe_changes() -> None:
    recipe = BaseRecipe()
    assert recipe.digest() == BaseRecipe().digest()
    assert BaseRecipe(packages=(*recipe.packages, "curl")).digest() != recipe.digest()
    assert BaseRecipe(setup_script=recipe.setup_script + "true\n").digest() != recipe.digest()


def test_without_root_podman_is_unavailable_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the end-to-end test's skip says where apt cannot install podman."""
    monkeypatch.setattr("deploy.podman.shutil.which", lambda tool: None if tool == "podman" else f"/usr/bin/{tool}")
    monkeypatch.setattr("deploy.podman.os.geteuid", lambda: 1000)
    with pytest.raises(PodmanUnavailable, match=r"^podman not installed and apt-get cannot install it here \(not root\)$"):
        ensure_installed()


def test_the_container_gets_deploy_bases_config() -> None:
    config = dict(line.split("=", 1) for line in cluster_config().splitlines() if "=" in line)
    assert config["diffmorpher.gateway_address"] == "0.0.0.0:7070"
    assert config["diffmorpher.health_address"] == "0.0.0.0:8090"
    assert config["model_store"] == "/models/model-store"


def _write_frames(folder: Path, pictures: list[Image.Image]) -> None:
    folder.mkdir()
    for index, picture in enumerate(pictures):
        picture.save(folder / f"frame_{index:03d}.png")


def test_the_frame_check_fails_on_wrong_frames(tmp_path: Path) -> None:
    """Frames that are the inputs pass; reversed, too few, or grey ones each fail, by name."""
    a, b = (Image.open(DEMO / name).convert("RGB") for name in ("red_circle.png", "blue_triangle.png"))
    grey = Image.new("RGB", a.size, (128, 128, 128))
    config = SmokeConfig(model_store=tmp_path, frames=3)
    cases = {"right": [a, grey, b], "reversed": [b, grey, a], "short": [a, b], "grey": [grey, grey, grey]}
    problems = {}
    for case, pictures in cases.items():
        _write_frames(tmp_path / case, pictures)
        result = SmokeResult()
        check_frames(config, tmp_path / case, result)
        problems[case] = result.problems
    assert problems["right"] == []
    assert any("first frame not nearer image A" in p for p in problems["reversed"])
    assert problems["short"] == ["2 frames, asked for 3"]
    assert any("far from its input" in p for p in problems["grey"])


# ---------------------------------------------------------------------------- with podman
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_image_serves_a_morph_and_drains_on_sigterm(model_store: Path, tmp_path: Path) -> None:
    try:
        ensure_installed()
    except PodmanUnavailable as error:
        pytest.skip(f"podman cannot run here: {error}")
    built = build_image(log=tmp_path / "build.log")
    print(built.summary())
    config = SmokeConfig(model_store=model_store)
    result = run_smoke(config)
    print(result)
    assert result.problems == []
    assert result.frames == config.frames and result.frame_size == (64, 64)
    assert result.first_to_a < result.first_to_b and result.last_to_b < result.last_to_a
    assert result.first_to_a < config.max_endpoint_diff and result.last_to_b < config.max_endpoint_diff
    # The preStop hook waited for the morph in flight, which completed; then SIGTERM ended the
    # container by itself, inside the grace period.
    assert result.drain_wait_s > 0 and result.in_flight_morph_s > 0
    assert result.exit_code == 0 and result.stop_s < config.grace_s
