"""Shared fixtures: the tiny random SD folder and the repository's paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_sd import save_tiny_sd

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO_ROOT / "models" / "tiny-shapes-sd"
DEMO_DIR = REPO_ROOT / "assets" / "demo"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))
