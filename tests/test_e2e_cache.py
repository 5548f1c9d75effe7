"""Two workers of one TorchServe share the LoRA/latent cache: two concurrent morphs of the same
images land on different workers; one fits, the other waits on the key's lock and reuses the
result; a later morph on either worker is a full hit."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures

import pytest

from client.auth import TokenSource
from client.morph_client import MorphClient
from reliability.corpus import request
from tests.conftest import EMBEDDED_MODEL, REPO_ROOT
from tests.torchserve_server import TorchServeProcess

pytestmark = pytest.mark.slow

OPTIONS = {"num_frames": 3, "lora_steps": 40, "num_inference_steps": 4, "use_reschedule": False, "seed": 5}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    root = tmp_path_factory.mktemp("cache-e2e")
    model = EMBEDDED_MODEL if (EMBEDDED_MODEL / "unet").is_dir() else request.getfixturevalue("tiny_sd_dir")
    subprocess.run(
        [sys.executable, "-m", "export", "--model", str(model), "--export-path", str(root / "store"),
         "--workers", "2"],
        cwd=REPO_ROOT, check=True, env={**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'handler'}:{REPO_ROOT}"},
    )
    with TorchServeProcess(root / "server", root / "store") as server:
        yield server


def morph(server: TorchServeProcess) -> dict:
    with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file), retries=0) as client:
        return client.predict(request(options=OPTIONS), deadline_s=600).header


def test_workers_share_fitted_loras_and_latents(two_workers: TorchServeProcess) -> None:
    assert len(two_workers.worker_pids()) == 2
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(lambda _: morph(two_workers), range(2))
    assert first["worker_pid"] != second["worker_pid"], "both morphs ran on one worker"
    states = sorted([c["lora"] for c in first["cache"]] + [c["lora"] for c in second["cache"]])
    assert states == ["hit", "hit", "miss", "miss"]  # each LoRA fitted once, by one worker
    fitter = first if first["cache"][0]["lora"] == "miss" else second
    waiter = second if fitter is first else first
    third = morph(two_workers)
    assert {c["lora"] for c in third["cache"]} == {"hit"} and {c["latent"] for c in third["cache"]} == {"hit"}
    assert third["timings"]["lora"] < 0.25 * fitter["timings"]["lora"]
    print(f"\ncache across workers: fit {fitter['timings']['lora']:.2f} s on {fitter['worker_pid']}, "
          f"waited {waiter['timings']['lora']:.2f} s on {waiter['worker_pid']}, warm {third['timings']['lora']:.3f} s")
