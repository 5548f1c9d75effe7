"""`make image-test`: the serving image run as a replica, morphed through, stopped
(`python -m deploy.image_smoke --model-store model_store`).

One container of the built image (deploy/image_build.py's IMAGE) is laid out as deploy/base's pod
lays out its two: the ConfigMap's config.properties at /etc/diffmorpher, the model archive under
/models/model-store (read-only), the run directory, the cache and a kubelet-style client-token
Secret; uid 1000. Its command is the image's single-container entrypoint
(deploy/image/kserve-entrypoint.sh), which runs TorchServe and the guard together as the pod's
two containers do. The gateway (7070) and health (8090) ports are published on free loopback
ports of the host (podman's default bridge network).

Then: wait for /healthz; one streamed morph of the demo pair with the project's client
(`python -m client`, a client token); check the frames (count, size, the first closer to image A
and the last closer to image B by mean absolute difference); a second morph and, while it runs,
the preStop hook (deploy/image/drain.sh) as the kubelet runs it, which must wait for that morph
to complete; `podman stop -t GRACE` (SIGTERM, SIGKILL only after GRACE seconds) and check the
container ended by itself within the grace period with exit code 0; remove it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from deploy.image_build import IMAGE, REPO_ROOT
from deploy.podman import Podman

CONFIGMAP = REPO_ROOT / "deploy" / "base" / "configmap.yaml"
DEMO = REPO_ROOT / "assets" / "demo"
CONTAINER_UID = 1000  # deploy/base/deployment.yaml's runAsUser, the image's USER
GATEWAY_PORT = 7070  # diffmorpher.gateway_address in the ConfigMap
HEALTH_PORT = 8090  # diffmorpher.health_address
TOKEN_NAME = "image-smoke"


@dataclass(frozen=True)
class SmokeConfig:
    model_store: Path  # a folder holding <model>.mar (`make export`: model_store/)
    image: str = IMAGE
    archive: str = "diffmorpher.mar"
    frames: int = 4
    # A quick morph that still ends on the inputs (tests/test_e2e_torchserve.py's TINY).
    options: dict[str, str] = field(default_factory=lambda: {
        "lora_steps": "3", "num_inference_steps": "8", "use_reschedule": "false", "seed": "7"})
    # Mean |frame - input| (0..255) the first frame may be from image A and the last from image B
    # (13.7 and 13.4 measured with the embedded model; the other input is about 65 away).
    max_endpoint_diff: float = 30.0
    # The morph running while the preStop hook drains: long enough (3 to 15 s on 2 shared cores)
    # that the hook finds the worker busy; a new LoRA step count, so the cache does not shorten it.
    drain_options: dict[str, str] = field(default_factory=lambda: {
        "lora_steps": "40", "num_inference_steps": "8", "use_reschedule": "false", "seed": "8"})
    ready_timeout_s: float = 600.0
    morph_deadline_s: float = 600.0
    grace_s: int = 30  # podman stop's SIGTERM-to-SIGKILL wait
    threads: int = 1  # OMP_NUM_THREADS in the container (2 shared cores in CI)


@dataclass
class SmokeResult:
    ready_s: float = 0.0
    morph_s: float = 0.0
    frames: int = 0
    frame_size: tuple[int, int] = (0, 0)
    first_to_a: float = 0.0  # mean |frame - input| over RGB, 0..255
    first_to_b: float = 0.0
    last_to_a: float = 0.0
    last_to_b: float = 0.0
    drain_log: str = ""
    drain_wait_s: int = -1  # what the preStop hook waited for the busy worker
    in_flight_morph_s: float = 0.0  # the morph it waited for, which must complete
    stop_s: float = 0.0
    exit_code: int = -1
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


class SmokeFailure(RuntimeError):
    """The container did not serve or stop as it should; the message holds its log's tail."""


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def cluster_config() -> str:
    """deploy/base's config.properties, as its ConfigMap mounts it."""
    configmap = yaml.safe_load(CONFIGMAP.read_text())
    return configmap["data"]["config.properties"]


def prepare_mounts(root: Path, config: SmokeConfig) -> tuple[list[str], str]:
    """The pod's volumes as podman arguments, and the client token. Host files are owned by
    the container's uid (the client-token Secret is mode 0400 as its defaultMode says)."""
    archive = config.model_store / config.archive
    if not archive.is_file():
        raise SmokeFailure(f"no model archive at {archive} (run `make export`)")
    etc = root / "etc"
    etc.mkdir()
    (etc / "config.properties").write_text(cluster_config())
    tokens = root / "client-tokens"
    tokens.mkdir()
    token = secrets.token_hex(32)
    (tokens / TOKEN_NAME).write_text(token)
    run, cache = root / "run", root / "cache"  # the pod's emptyDirs
    run.mkdir()
    cache.mkdir()
    for path, mode in ((etc, 0o755), (etc / "config.properties", 0o444), (tokens, 0o500),
                       (tokens / TOKEN_NAME, 0o400), (run, 0o700), (cache, 0o700)):
        os.chown(path, CONTAINER_UID, CONTAINER_UID)
        path.chmod(mode)
    args = [
        "--volume", f"{etc}:/etc/diffmorpher:ro",
        "--volume", f"{archive.resolve()}:/models/model-store/{config.archive}:ro",
        "--volume", f"{tokens}:/var/run/secrets/diffmorpher/client-tokens:ro",
        "--volume", f"{run}:/run/diffmorpher",
        "--volume", f"{cache}:/var/cache/diffmorpher",
    ]  # fmt: skip
    return args, token


def run_command(config: SmokeConfig, name: str, mounts: list[str], ports: dict[str, int]) -> list[str]:
    """`podman run` of the image as one replica (environment as deploy/base sets it)."""
    env = {
        "DIFFMORPHER_TS_CONFIG": "/etc/diffmorpher/config.properties",
        "DIFFMORPHER_MODEL_ROOT": "/models",
        "DIFFMORPHER_RUN_DIR": "/run/diffmorpher",
        "DIFFMORPHER_CONTROL_DIR": "/run/diffmorpher/control",
        "DIFFMORPHER_CACHE_DIR": "/var/cache/diffmorpher",
        "OMP_NUM_THREADS": str(config.threads),
    }
    return [
        "run", "--detach", "--name", name, "--user", f"{CONTAINER_UID}:{CONTAINER_UID}",
        "--publish", f"127.0.0.1:{ports['gateway']}:{GATEWAY_PORT}",
        "--publish", f"127.0.0.1:{ports['health']}:{HEALTH_PORT}",
        *mounts, *(arg for key, value in env.items() for arg in ("--env", f"{key}={value}")),
        config.image, "/bin/sh", "/srv/diffmorpher/deploy/image/kserve-entrypoint.sh",
    ]  # fmt: skip


def container_state(podman: Podman, name: str) -> dict:
    return json.loads(podman.run("container", "inspect", name).stdout)[0]["State"]


def logs(podman: Podman, name: str, tail: int = 60) -> str:
    result = podman.run("logs", "--tail", str(tail), name, check=False)
    return (result.stdout or "") + (result.stderr or "")


def wait_healthy(podman: Podman, name: str, health_port: int, timeout_s: float) -> float:
    """Seconds until /healthz answers 200; fails at once when the container exits."""
    start = time.monotonic()
    url = f"http://127.0.0.1:{health_port}/healthz"
    while time.monotonic() - start < timeout_s:
        if not container_state(podman, name)["Running"]:
            raise SmokeFailure(f"the container exited before /healthz was healthy:\n{logs(podman, name)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise SmokeFailure(f"/healthz not healthy within {timeout_s:.0f} s:\n{logs(podman, name)}")


def morph(config: SmokeConfig, gateway_port: int, token: str, out: Path, options: dict[str, str]) -> float:
    """The demo pair through the gateway with `python -m client` (streamed, frames saved)."""
    prompts = json.loads((DEMO / "prompts.json").read_text())
    names = ("red_circle.png", "blue_triangle.png")
    command = [
        sys.executable, "-m", "client", "--target", f"127.0.0.1:{gateway_port}", "--token", token,
        "morph", *(str(DEMO / n) for n in names), "--prompt-a", prompts[names[0]], "--prompt-b", prompts[names[1]],
        "--frames", str(config.frames), *(arg for k, v in options.items() for arg in ("--option", f"{k}={v}")),
        "--stream", "--frames-dir", str(out / "frames"), "--out", str(out / "morph.gif"),
        "--metadata-out", str(out / "metadata.json"), "--deadline", str(config.morph_deadline_s),
    ]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=config.morph_deadline_s + 60)
    if result.returncode != 0:
        raise SmokeFailure(f"the client's morph failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.monotonic() - start


def check_frames(config: SmokeConfig, frames_dir: Path, result: SmokeResult) -> None:
    """Count, one size for all, the first frame near image A and nearer it than image B, the
    last likewise for image B."""
    paths = sorted(frames_dir.glob("frame_*.png"))
    result.frames = len(paths)
    if len(paths) != config.frames:
        result.problems.append(f"{len(paths)} frames, asked for {config.frames}")
        if not paths:
            return
    images = [Image.open(path).convert("RGB") for path in paths]
    sizes = {image.size for image in images}
    result.frame_size = images[0].size
    if len(sizes) != 1:
        result.problems.append(f"frames of different sizes: {sorted(sizes)}")
    frames = [np.asarray(image, dtype=np.float32) for image in images]
    inputs = [np.asarray(Image.open(DEMO / n).convert("RGB").resize(images[0].size), dtype=np.float32)
              for n in ("red_circle.png", "blue_triangle.png")]
    result.first_to_a = float(np.abs(frames[0] - inputs[0]).mean())
    result.first_to_b = float(np.abs(frames[0] - inputs[1]).mean())
    result.last_to_a = float(np.abs(frames[-1] - inputs[0]).mean())
    result.last_to_b = float(np.abs(frames[-1] - inputs[1]).mean())
    if max(result.first_to_a, result.last_to_b) > config.max_endpoint_diff:
        result.problems.append(f"an end frame is far from its input: first-to-A {result.first_to_a:.1f}, "
                               f"last-to-B {result.last_to_b:.1f} (at most {config.max_endpoint_diff})")
    if not result.first_to_a < result.first_to_b:
        result.problems.append(f"first frame not nearer image A: {result.first_to_a:.1f} vs {result.first_to_b:.1f}")
    if not result.last_to_b < result.last_to_a:
        result.problems.append(f"last frame not nearer image B: {result.last_to_b:.1f} vs {result.last_to_a:.1f}")


def wait_busy(podman: Podman, name: str, timeout_s: float = 120.0) -> None:
    """Until a worker's heartbeat in the container says busy (what drain.sh waits on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        beats = podman.run("exec", name, "/bin/sh", "-c", "cat /run/diffmorpher/control/workers/*.json", check=False)
        if '"state": "busy"' in beats.stdout:
            return
        time.sleep(0.2)
    raise SmokeFailure(f"no worker turned busy within {timeout_s:.0f} s of the in-flight morph")


def drain(podman: Podman, config: SmokeConfig, name: str, gateway_port: int, token: str, out: Path,
          result: SmokeResult) -> None:
    """The preStop hook (drain.sh, as the kubelet runs it) while a morph runs: it must wait for
    that morph, and the morph must complete."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(morph, config, gateway_port, token, out / "in-flight", config.drain_options)
        wait_busy(podman, name)
        hook = podman.run("exec", name, "/bin/sh", "/srv/diffmorpher/deploy/image/drain.sh", check=False,
                          timeout=config.morph_deadline_s)
        result.in_flight_morph_s = running.result()
    result.drain_log = (hook.stdout + hook.stderr).strip()
    waited = re.search(r"drain: waited (\d+) s", result.drain_log)
    result.drain_wait_s = int(waited.group(1)) if waited else -1
    if hook.returncode != 0 or waited is None:
        result.problems.append(f"the preStop drain failed ({hook.returncode}): {result.drain_log[-500:]}")
    elif result.drain_wait_s == 0:
        result.problems.append("the preStop drain did not wait for the running morph")


def stop(podman: Podman, config: SmokeConfig, name: str, result: SmokeResult) -> None:
    """SIGTERM with GRACE seconds before SIGKILL: the container must end by itself (exit 0,
    inside the grace period): the entrypoint stopped the guard and TorchServe and waited for
    both (a process that died on its own makes it exit 1; a kill after the grace period, 137)."""
    start = time.monotonic()
    podman.run("stop", "--time", str(config.grace_s), name, timeout=config.grace_s + 60)
    result.stop_s = time.monotonic() - start
    state = container_state(podman, name)
    result.exit_code = int(state["ExitCode"])
    if result.exit_code != 0:
        result.problems.append(f"exit code {result.exit_code} after SIGTERM (137: killed after the grace period)")
    if result.stop_s >= config.grace_s:
        result.problems.append(f"stopping took {result.stop_s:.1f} s, the grace period is {config.grace_s} s")


def run_smoke(config: SmokeConfig, podman: Podman = Podman(), keep: Path | None = None) -> SmokeResult:
    """Everything `make image-test` does; the container is removed whatever happens. Frames and
    metadata are left in `keep` when given."""
    if not podman.image_exists(config.image):
        raise SmokeFailure(f"no image {config.image} (run `make image`)")
    result = SmokeResult()
    name = f"diffmorpher-smoke-{os.getpid()}-{secrets.token_hex(3)}"
    ports = dict(zip(("gateway", "health"), free_ports(2)))
    with tempfile.TemporaryDirectory(prefix="diffmorpher-smoke-") as tmp:
        root = Path(tmp)
        mounts, token = prepare_mounts(root, config)
        out = keep or root / "out"
        podman.run(*run_command(config, name, mounts, ports))
        try:
            result.ready_s = wait_healthy(podman, name, ports["health"], config.ready_timeout_s)
            try:
                result.morph_s = morph(config, ports["gateway"], token, out, config.options)
                check_frames(config, out / "frames", result)
                drain(podman, config, name, ports["gateway"], token, out, result)
            except SmokeFailure as error:
                raise SmokeFailure(f"{error}\ncontainer log:\n{logs(podman, name)}") from None
            stop(podman, config, name, result)
            (out / "container.log").write_text(logs(podman, name, tail=100000))
        finally:
            podman.run("rm", "--force", "--time", "0", name, check=False)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.image_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--grace", type=int, default=SmokeConfig.grace_s, help="podman stop's grace period (s)")
    parser.add_argument("--out", type=Path, default=None, help="keep the frames and metadata here")
    args = parser.parse_args(argv)
    config = SmokeConfig(model_store=args.model_store, image=args.image, grace_s=args.grace)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    result = run_smoke(config, keep=args.out)
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "problems"}, indent=1))
    for problem in result.problems:
        print(f"FAIL: {problem}")
    print("image-test passed" if result.passed else "image-test FAILED")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
