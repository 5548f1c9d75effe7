"""Who may call the gateway: client tokens from a mounted Secret, checked before TorchServe.

TorchServe 0.12 draws its keys at random when it starts and only writes them to its own
key_file.json, so behind a Service every replica has different keys and no outside client can
hold them all. With `--client-tokens PATH` the gateway authenticates clients itself, against
tokens an operator provides, and calls its own TorchServe with that TorchServe's current
inference key (re-read from the key file whenever the guard's rotation rewrites it). Every
replica mounts the same Secret, so one client token works on all of them.

PATH is either
- a directory, as Kubernetes mounts a Secret: each file is one token (its whole content,
  stripped); names starting with "." (the kubelet's `..data` bookkeeping) are skipped; or
- a file: one token per line; blank lines and lines starting with "#" are skipped.
More than one token may be valid at once, which is how a token is rotated without downtime: add
the new one, move the clients, remove the old one. The set is re-read when the files change (the
kubelet swaps a Secret's files atomically), checked at most once per `recheck_s`.

Fail closed: a missing or empty source, or one whose every token is unusable, admits nobody
(and /healthz turns 503, since the replica can serve no one); a single unusable token (shorter
than MIN_TOKEN_CHARS) is left out and named in /status, never silently. Tokens are compared in
constant time and never logged.

Without `--client-tokens` the gateway forwards the client's own `authorization` header and
TorchServe checks it (one host, clients reading key_file.json), as before.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import grpc

from morph_protocol.keyfile import TokenSource

logger = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
BEARER = "bearer "
# Health RPCs a load balancer or KServe calls without credentials; they carry no data.
UNAUTHENTICATED_METHODS = frozenset({"Ping", "ServerLive", "ServerReady", "ModelReady"})

MISSING_TOKEN = (
    "authentication required: send the metadata 'authorization: Bearer <token>' with one of this "
    "service's client tokens (client: --token or DIFFMORPHER_TOKEN)"
)
WRONG_TOKEN = "the bearer token is not one of this service's client tokens (revoked, or mistyped)"
NO_TOKENS = "this service admits no client: its client token source is unusable ({error}); tell its operator"
UPSTREAM_KEY_REFUSED = (
    "the model server refused the gateway's own key (it was being renewed); retry"
)


class Admission(Protocol):
    """How the gateway decides who may call, and what it sends TorchServe."""

    enabled: bool

    def refusal(self, context: grpc.ServicerContext, method: str) -> tuple[grpc.StatusCode, str] | None: ...

    def upstream_metadata(self, context: grpc.ServicerContext) -> list[tuple[str, str]]: ...

    def renew_upstream_key(self) -> bool: ...

    def status(self) -> dict[str, object]: ...


class PassThrough:
    """The client's `authorization` goes to TorchServe unchanged; TorchServe decides."""

    enabled = False

    def refusal(self, context: grpc.ServicerContext, method: str) -> tuple[grpc.StatusCode, str] | None:
        return None

    def upstream_metadata(self, context: grpc.ServicerContext) -> list[tuple[str, str]]:
        return [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]

    def renew_upstream_key(self) -> bool:
        return False  # the client's key: the client renews it (morph_protocol/keyfile.py)

    def status(self) -> dict[str, object]:
        return {"mode": "passthrough"}


@dataclass
class ClientTokens:
    """The set of valid client tokens, re-read from `path` when it changes."""

    path: Path
    recheck_s: float = 1.0
    tokens: tuple[bytes, ...] = ()
    problems: tuple[str, ...] = ()  # why a token or the whole source is unusable
    loads: int = 0
    _signature: object = None
    _checked_at: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def current(self) -> tuple[bytes, ...]:
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at >= self.recheck_s:
                self._checked_at = now
                signature = self._stat_signature()
                if signature != self._signature:
                    self._load(signature)
            return self.tokens

    def admits(self, presented: str) -> bool:
        candidate = presented.encode()
        admitted = False
        for token in self.current():  # no early exit: the time does not tell which one matched
            admitted |= hmac.compare_digest(candidate, token)
        return admitted

    # ------------------------------------------------------------------ reading
    def _entries(self) -> list[tuple[str, Path]]:
        if self.path.is_dir():
            return sorted((p.name, p) for p in self.path.iterdir() if not p.name.startswith(".") and p.is_file())
        return [(self.path.name, self.path)]

    def _stat_signature(self) -> object:
        try:
            return tuple(
                (name, st.st_ino, st.st_mtime_ns, st.st_size)
                for name, path in self._entries()
                for st in (path.stat(),)
            )
        except OSError as error:
            return ("error", str(error))

    def _load(self, signature: object) -> None:
        tokens: list[bytes] = []
        problems: list[str] = []
        try:
            for name, path in self._entries():
                lines = [path.read_text().strip()] if self.path.is_dir() else path.read_text().splitlines()
                for number, line in enumerate(lines, 1):
                    token = line.strip()
                    if not token or (not self.path.is_dir() and token.startswith("#")):
                        continue
                    where = name if self.path.is_dir() else f"{name} line {number}"
                    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
                        problems.append(f"{where}: unusable token (needs {MIN_TOKEN_CHARS}+ characters, no spaces)")
                        continue
                    tokens.append(token.encode())
        except OSError as error:
            problems.append(f"cannot read {self.path}: {error.strerror or error}")
            tokens = []
        if not tokens and not problems:
            problems.append(f"no tokens in {self.path}")
        self.tokens, self.problems, self._signature = tuple(tokens), tuple(problems), signature
        self.loads += 1
        log = logger.error if not tokens else logger.warning if problems else logger.info
        log("client tokens from %s: %d valid%s", self.path, len(tokens),
            f"; {'; '.join(problems)}" if problems else "")


@dataclass
class ClientTokenAdmission:
    """Clients present one of `tokens`; TorchServe gets `upstream`'s key (None: no auth upstream)."""

    tokens: ClientTokens
    upstream: TokenSource
    enabled: ClassVar[bool] = True
    refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def refusal(self, context: grpc.ServicerContext, method: str) -> tuple[grpc.StatusCode, str] | None:
        if method in UNAUTHENTICATED_METHODS:
            return None
        presented = bearer_token(context)
        if not self.tokens.current():
            answer = grpc.StatusCode.UNAVAILABLE, NO_TOKENS.format(error="; ".join(self.tokens.problems))
        elif presented is None:
            answer = grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN
        elif not self.tokens.admits(presented):
            answer = grpc.StatusCode.UNAUTHENTICATED, WRONG_TOKEN
        else:
            return None
        with self._lock:
            self.refused += 1
        return answer

    def upstream_metadata(self, context: grpc.ServicerContext) -> list[tuple[str, str]]:
        return self.upstream.metadata()

    def renew_upstream_key(self) -> bool:
        """After TorchServe refused our key: True when the key file now holds another one."""
        try:
            return self.upstream.refresh()
        except Exception as error:  # noqa: BLE001 - a key file mid-rewrite: the caller answers UNAVAILABLE
            logger.warning("could not re-read TorchServe's key: %s", error)
            return False

    def status(self) -> dict[str, object]:
        valid = self.tokens.current()
        return {"mode": "client_tokens", "source": str(self.tokens.path), "valid_tokens": len(valid),
                "problems": list(self.tokens.problems), "refused_calls": self.refused}


def bearer_token(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == "authorization" and value[: len(BEARER)].lower() == BEARER:
            token = value[len(BEARER):].strip()
            return token or None
    return None


def admission_from_args(client_tokens: str | None, key_file: Path | None) -> Admission:
    """`--client-tokens` given: check clients, send TorchServe its own key (`key_file`, or none
    when token authorization is off). Otherwise pass the client's header through."""
    if not client_tokens:
        return PassThrough()
    upstream = TokenSource(key_file=key_file, enabled=key_file is not None, use_env=False)
    return ClientTokenAdmission(ClientTokens(Path(os.path.expanduser(client_tokens))), upstream)
