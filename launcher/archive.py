"""The model archive a launched server serves: `python -m export` into a model store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

MODEL_NAME = "diffmorpher"


def export_model(
    model: Path,
    store: Path,
    *export_args: str,
    job_queue_size: int | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> Path:
    """`python -m export` of `model` into the model store `store` (more export flags in
    `export_args`). With `job_queue_size` or `workers` the export is a no-archive folder whose
    model-config.yaml gets those overrides (model-config.yaml wins over config.properties'
    job_queue_size in TorchServe 0.12). Returns the store."""
    overrides = job_queue_size is not None or workers is not None
    if overrides and "--archive-format" not in export_args:
        export_args = (*export_args, "--archive-format", "no-archive")
    subprocess.run(
        [sys.executable, "-m", "export", "--model", str(model), "--export-path", str(store), *export_args],
        check=True, timeout=600, stdout=subprocess.DEVNULL if quiet else None,
    )  # fmt: skip
    if overrides:
        config_path = store / MODEL_NAME / "model-config.yaml"
        config = yaml.safe_load(config_path.read_text())
        if job_queue_size is not None:
            config["jobQueueSize"] = job_queue_size
        if workers is not None:
            config["minWorkers"] = config["maxWorkers"] = workers
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return store
