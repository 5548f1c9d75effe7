"""TorchServe's management API as the guard uses it: describe, scale, rotate tokens (stdlib
only). Its config.properties is read by morph_protocol.properties."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morph_protocol.keyfile import TokenError, read_key_file


class ManagementError(RuntimeError):
    """The management API did not answer as expected."""


@dataclass
class ManagementApi:
    url: str  # e.g. http://127.0.0.1:8081
    # TorchServe's key_file.json (management and API keys); None where the server runs with
    # disable_token_authorization=true: it then writes no key file and wants no header.
    key_file: Path | None
    timeout_s: float = 10.0

    def _request(self, method: str, path: str, key: str | None, timeout_s: float | None = None) -> Any:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        request = urllib.request.Request(self.url.rstrip("/") + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise ManagementError(f"{method} {path}: HTTP {error.code}: {error.read()[:300]!r}") from error
        except (urllib.error.URLError, OSError) as error:
            raise ManagementError(f"{method} {path}: {error}") from error
        try:
            return json.loads(body) if body.strip() else {}
        except json.JSONDecodeError:
            return {"text": body.decode("utf-8", "replace")}

    def _key(self, api: str) -> str | None:
        if self.key_file is None:
            return None
        try:
            return read_key_file(self.key_file, api)
        except TokenError as error:  # e.g. TorchServe has not written the file yet
            raise ManagementError(str(error)) from error

    def _management(self, method: str, path: str, timeout_s: float | None = None) -> Any:
        return self._request(method, path, self._key("management"), timeout_s)

    def describe(self, model: str) -> dict[str, Any]:
        answer = self._management("GET", f"/models/{urllib.parse.quote(model)}")
        if not isinstance(answer, list) or not answer:
            raise ManagementError(f"unexpected describe answer for {model}: {str(answer)[:200]}")
        return answer[0]

    def scale(self, model: str, min_workers: int, timeout_s: float = 120.0) -> None:
        """Synchronous: returns when TorchServe has started or stopped the workers."""
        query = urllib.parse.urlencode({"min_worker": min_workers, "synchronous": "true"})
        self._management("PUT", f"/models/{urllib.parse.quote(model)}?{query}", timeout_s)

    def rotate_token(self, kind: str) -> None:
        """Ask TorchServe for a new `kind` ("management" or "inference") key; it rewrites the key
        file. Authorised by the API key, which does not expire."""
        self._request("POST", f"/token?type={kind}", self._key("API"))
