"""`python -m guard --ts-config config.properties`: run the guard beside a TorchServe.

Addresses come from the same config.properties TorchServe uses (its gRPC inference port is the
gateway's upstream, its management address the watchdog's, token_expiration_min the rotation
period); the gateway listens on `diffmorpher.gateway_address` and the health endpoint on
`diffmorpher.health_address` from that file (TorchServe ignores keys it does not know).
"""

from __future__ import annotations

import argparse
import os
import logging
import signal
import threading
from pathlib import Path

from .client_auth import admission_from_args
from morph_protocol.control import CONTROL_DIR_ENV, ControlDir
from morph_protocol.properties import read_properties
from .gateway import Gateway, GatewayConfig
from morph_protocol.management import ManagementApi
from .service import Guard
from .tokens import TokenRotator
from .watchdog import Watchdog, WatchdogConfig


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def build_guard(args: argparse.Namespace) -> Guard:
    props = read_properties(Path(args.ts_config))
    management_url = props.get("management_address", "http://127.0.0.1:8081")
    upstream = f"{props.get('grpc_inference_address', '127.0.0.1')}:{props.get('grpc_inference_port', '7070')}"
    gateway_address = args.listen or props.get("diffmorpher.gateway_address", "127.0.0.1:7070")
    health_address = _host_port(args.health or props.get("diffmorpher.health_address", "127.0.0.1:8090"))
    control_dir = args.control_dir or os.environ.get(CONTROL_DIR_ENV)
    control = ControlDir(Path(control_dir)) if control_dir else None
    token_auth = props.get("disable_token_authorization", "false").lower() != "true"
    key_file = Path(args.key_file) if token_auth else None
    api = ManagementApi(management_url, key_file)
    lifetime_s = float(props.get("token_expiration_min", "60")) * 60
    gateway = Gateway(
        GatewayConfig.from_properties(gateway_address, upstream, props),
        control,
        admission_from_args(args.client_tokens, key_file),
    )
    watchdog = Watchdog(
        api, control,
        WatchdogConfig(args.model, interval_s=args.interval, grace_s=2 * args.interval,
                       wedge_after_s=args.wedge_after, stall_after_s=args.stall_after),
    )
    return Guard(gateway, watchdog, TokenRotator(api, lifetime_s) if token_auth else None, health_address)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m guard", description=__doc__)
    parser.add_argument("--ts-config", default="config.properties", help="TorchServe's config.properties")
    parser.add_argument("--key-file", default="key_file.json", help="the key file TorchServe wrote")
    parser.add_argument(
        "--client-tokens", metavar="PATH",
        help="check clients' bearer tokens against this file (one per line) or directory (a mounted "
             "Secret: one token per file), re-read when it changes, and call TorchServe with its own "
             "key; without it the client's token is passed to TorchServe (guard/client_auth.py)")
    parser.add_argument("--model", default="diffmorpher")
    parser.add_argument("--listen", help="gateway host:port (default: diffmorpher.gateway_address)")
    parser.add_argument("--health", help="health host:port (default: diffmorpher.health_address)")
    parser.add_argument("--control-dir", help=f"shared with the workers (default: ${CONTROL_DIR_ENV})")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between watchdog rounds")
    parser.add_argument("--wedge-after", type=float, default=WatchdogConfig.wedge_after_s,
                        help="seconds without a morph step after which a busy worker is killed")
    parser.add_argument("--stall-after", type=float, default=WatchdogConfig.stall_after_s,
                        help="seconds requests may wait while every worker is idle and no heartbeat moves "
                             "before /healthz turns 503 and the workers are restarted (a busy worker never "
                             "counts: that is --wedge-after)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s guard %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    build_guard(args).run(stop)


if __name__ == "__main__":
    main()
