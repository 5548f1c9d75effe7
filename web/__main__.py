"""`python -m web`: the morph web page on http://127.0.0.1:7860/, a client of the service.

The service token is read here (key file, $DIFFMORPHER_TOKEN or --token) and never reaches a
browser. Limits come from the service's config.properties (--ts-config) and MorphConfig.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from morph_protocol.keyfile import TokenError, TokenSource
from client.morph_client import DEFAULT_MODEL, DEFAULT_TARGET

from .app import WebSettings, create_app
from .limits import DEFAULT_TS_CONFIG, page_limits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m web", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--target", default=DEFAULT_TARGET, help="the service's gRPC gateway host:port")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--token", help="service token (prefer $DIFFMORPHER_TOKEN or --key-file: "
                        "a flag is visible in the process list)")
    parser.add_argument("--key-file", help="TorchServe's key_file.json (default ./key_file.json)")
    parser.add_argument("--no-auth", action="store_true", help="send no token (auth disabled)")
    parser.add_argument("--ts-config", type=Path, default=DEFAULT_TS_CONFIG,
                        help="the service's config.properties (max_request_size)")
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds a morph may take")
    parser.add_argument("--retries", type=int, default=2, help="retries on UNAVAILABLE before any message")
    return parser


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s web %(levelname)s %(message)s")
    tokens = TokenSource(token=args.token, key_file=args.key_file, enabled=not args.no_auth)
    try:
        tokens.get()
    except TokenError as error:  # TorchServe may still be starting: the key file comes later
        logging.getLogger("web").warning("%s (the page will retry on each morph)", error)
    try:
        limits = page_limits(args.ts_config)
    except (RuntimeError, OSError) as error:  # no options module, no config.properties
        raise SystemExit(f"error: {error}") from error
    settings = WebSettings(limits, target=args.target, model=args.model, tokens=tokens,
                           deadline_s=args.deadline, retries=args.retries)
    print(f"Morph web page: http://{args.host}:{args.port}/  (service {args.target}; Ctrl-C stops it)",
          flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
