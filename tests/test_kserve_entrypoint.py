"""The KServe predictor's entrypoint (deploy/image/kserve-entrypoint.sh) run for real, in the
layout KServe gives it: the model store under a "mounted" model root, the image's
deploy/kserve/config.properties (only ports and host-side paths changed, and loopback for the
gateway, as tests bind), a kubelet-style client-token Secret, and TorchServe-style arguments such
as an InferenceService could append to our runtime's command (ignored). A KServe v2 client
(tritonclient) then morphs through the gateway's Open Inference Protocol service with a client
token; without one it is refused; and SIGTERM stops TorchServe, its worker and the guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from morph_protocol.properties import read_properties, replace_properties
from tests.test_client_auth import TOKEN_A, mount_secret
from tests.test_e2e_torchserve import TINY, demo_inputs
from tests.test_oip import MODEL, infer_inputs
from launcher.torchserve import REPO_ROOT, free_ports

pytestmark = pytest.mark.slow

ENTRYPOINT = REPO_ROOT / "deploy" / "image" / "kserve-entrypoint.sh"
KSERVE_CONFIG = REPO_ROOT / "deploy" / "kserve" / "config.properties"
RUNTIME_ARGS = ["torchserve", "--start", "--model-store=/mnt/models/model-store",
                "--ts-config=/mnt/models/config/config.properties"]


def config_for_this_host(root: Path, model_root: Path) -> tuple[Path, dict[str, int]]:
    """The image's config with free loopback ports and this host's paths; nothing else changed."""
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management", "gateway", "health")
    ports = dict(zip(names, free_ports(len(names))))
    overrides = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "diffmorpher.gateway_address": f"127.0.0.1:{ports['gateway']}",
        "diffmorpher.health_address": f"127.0.0.1:{ports['health']}",
        "model_store": str(model_root / "model-store"),
        "metrics_config": str(REPO_ROOT / "handler" / "metrics.yaml"),
    }
    text, missing = replace_properties(KSERVE_CONFIG.read_text(), overrides)
    assert not missing, missing  # every overridden key is in the image's config
    config = root / "config.properties"
    config.write_text(text)
    return config, ports


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def test_the_entrypoint_serves_oip_behind_the_guard_and_stops_on_sigterm(tmp_path: Path, model_store: Path) -> None:
    model_root = tmp_path / "mnt-models"
    (model_root / "model-store").mkdir(parents=True)
    (model_root / "model-store" / "diffmorpher.mar").symlink_to(model_store / "diffmorpher.mar")
    config, ports = config_for_this_host(tmp_path, model_root)
    assert read_properties(config)["disable_token_authorization"] == "false"
    secret = tmp_path / "client-tokens"
    mount_secret(secret, {"client-a": TOKEN_A}, 1)
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "DIFFMORPHER_TS_CONFIG": str(config),
        "DIFFMORPHER_MODEL_ROOT": str(model_root),
        "DIFFMORPHER_RUN_DIR": str(tmp_path / "run"),
        "DIFFMORPHER_CLIENT_TOKENS": str(secret),
        "DIFFMORPHER_CACHE_DIR": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path / "tmp"),
        "LOG_LOCATION": str(tmp_path / "logs"),
        "METRICS_LOCATION": str(tmp_path / "logs"),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("DIFFMORPHER_CONTROL_DIR", None)  # the entrypoint derives it from the run directory
    log = open(tmp_path / "entrypoint.out", "wb")
    process = subprocess.Popen(["/bin/sh", str(ENTRYPOINT), *RUNTIME_ARGS], cwd=REPO_ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while health(ports["health"]) != 200:
            assert process.poll() is None, (tmp_path / "entrypoint.out").read_text()[-4000:]
            assert time.monotonic() < deadline, "not healthy within 300 s"
            time.sleep(1)
        assert (tmp_path / "run" / "key_file.json").is_file()  # TorchServe started in the run directory

        images, prompts = demo_inputs()
        options = dict(TINY)
        with triton.InferenceServerClient(f"127.0.0.1:{ports['gateway']}") as client:
            assert client.is_server_live()  # health RPCs need no token
            with pytest.raises(InferenceServerException) as refused:
                client.infer(MODEL, infer_inputs(images, prompts), parameters=options, client_timeout=60)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
            result = client.infer(MODEL, infer_inputs(images, prompts), parameters=options,
                                  headers={"authorization": f"Bearer {TOKEN_A}"}, client_timeout=600)
        metadata = json.loads(result.as_numpy("metadata")[0])
        assert metadata["num_frames"] == TINY["num_frames"] and len(result.as_numpy("frames")) >= 1
        assert "ignoring the runtime's arguments: torchserve --start" in (tmp_path / "entrypoint.out").read_text()

        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        print(f"\nentrypoint: served a morph through OIP; stopped {time.monotonic() - stopped:.1f} s after SIGTERM")
        time.sleep(1)
        survivors = subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert survivors == [], f"left running after SIGTERM: {survivors}"
    finally:
        if process.poll() is None:
            process.kill()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
