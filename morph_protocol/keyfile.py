"""Where the client's bearer token comes from: an explicit token, an env var, or TorchServe's key file.

TorchServe 0.12 (token authorization on) writes `key_file.json` into the directory it was started
from, with an inference key that expires (token_expiration_min). TorchServe itself never renews
it; the guard (guard/tokens.py) asks for a new key at half its lifetime and TorchServe rewrites
the file. So a token read from the key file is re-read whenever the file changes, and once more
when the server answers PERMISSION_DENIED; an explicit or env token is used as given.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "DIFFMORPHER_TOKEN"
KEY_FILE_ENV = "DIFFMORPHER_KEY_FILE"
DEFAULT_KEY_FILE = "key_file.json"


class TokenError(RuntimeError):
    """No usable token could be found."""


def read_key_file(path: str | Path, api: str = "inference", *, settle_s: float = 1.0) -> str:
    """The `api` ("inference" or "management") key from a TorchServe key file.

    TorchServe rewrites the file in place when a key is renewed (truncate, then write), so a
    read can see it empty or half-written: an unreadable file is read again for up to
    `settle_s` before it counts as broken."""
    path = Path(path)
    deadline = time.monotonic() + settle_s
    while True:
        try:
            content = json.loads(path.read_text())
            break
        except FileNotFoundError as error:
            raise TokenError(
                f"TorchServe key file {path} not found: pass --key-file pointing to the key_file.json "
                f"in the directory TorchServe was started from, or set {TOKEN_ENV}"
            ) from error
        except json.JSONDecodeError as error:
            if time.monotonic() >= deadline:
                raise TokenError(f"TorchServe key file {path} is not valid JSON: {error}") from error
            time.sleep(0.02)
    try:
        key = content[api]["key"]
    except (KeyError, TypeError) as error:
        raise TokenError(f"TorchServe key file {path} has no {api!r} key") from error
    if not isinstance(key, str) or not key:
        raise TokenError(f"TorchServe key file {path} has an empty {api!r} key")
    return key


@dataclass
class TokenSource:
    """Resolves the token lazily; `refresh()` re-reads the key file after the key expired.

    Precedence: explicit `token`, then the env var, then the key file (explicit path, the
    DIFFMORPHER_KEY_FILE env var, or ./key_file.json). `enabled=False` sends no token (for
    servers with token authorization disabled). `use_env=False` ignores both env vars (the
    guard reading its own TorchServe's key file, whatever its environment says).
    """

    token: str | None = None
    key_file: str | Path | None = None
    enabled: bool = True
    use_env: bool = True
    _cached: str | None = None
    _cached_stamp: tuple[int, int] | None = None  # the key file's (mtime_ns, size) when read

    def _key_file_path(self) -> Path:
        from_env = os.environ.get(KEY_FILE_ENV) if self.use_env else None
        return Path(self.key_file or from_env or DEFAULT_KEY_FILE)

    def _env_token(self) -> str | None:
        return os.environ.get(TOKEN_ENV) if self.use_env else None

    @property
    def refreshable(self) -> bool:
        """Only a key-file token can change behind our back."""
        return self.enabled and not self.token and not self._env_token()

    def get(self) -> str | None:
        if not self.enabled:
            return None
        if self.token:
            return self.token
        if self._env_token():
            return self._env_token()
        if self._cached is None or self._stamp() != self._cached_stamp:
            self._read()
        return self._cached

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self._key_file_path().stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _read(self) -> None:
        stamp = self._stamp()
        self._cached = read_key_file(self._key_file_path())
        self._cached_stamp = stamp

    def refresh(self) -> bool:
        """Re-read the key file; True when it now holds a different key."""
        if not self.refreshable:
            return False
        previous = self._cached
        self._read()
        return self._cached != previous

    def refresh_quietly(self) -> None:
        """Forget a cached key so the next call re-reads the file (which may not exist yet)."""
        if self.refreshable:
            self._cached = None

    def metadata(self) -> list[tuple[str, str]]:
        token = self.get()
        return [("authorization", f"Bearer {token}")] if token else []
