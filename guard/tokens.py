"""Keeping TorchServe's tokens valid: rotate each key well before it expires.

TorchServe 0.12 writes key_file.json once at start; its management and inference keys then
expire (token_expiration_min) and are replaced only when someone calls POST /token with the
API key. Unattended, the service would answer PERMISSION_DENIED to everyone an hour after start.
The rotator renews each key when less than half of its lifetime is left; TorchServe rewrites
the key file, and clients that read the file (morph_protocol/keyfile.py) pick the new key up on their next
call (they re-read when the file changes, and once more on PERMISSION_DENIED).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from morph_protocol.management import ManagementApi, ManagementError

logger = logging.getLogger(__name__)

KINDS = ("management", "inference")


def expirations(key_file: Path) -> dict[str, float]:
    """Unix expiry time of each expiring key in the key file."""
    content = json.loads(key_file.read_text())
    result = {}
    for kind in KINDS:
        text = str(content.get(kind, {}).get("expiration time", ""))
        if text:
            result[kind] = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    return result


@dataclass
class TokenRotator:
    api: ManagementApi
    lifetime_s: float  # token_expiration_min * 60, from config.properties
    rotations: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind in KINDS})
    last_error: str = ""

    def due(self, now: float) -> list[str]:
        try:
            expiry = expirations(self.api.key_file)
        except (OSError, ValueError) as error:
            self.last_error = f"cannot read {self.api.key_file}: {error}"
            return []
        return [kind for kind, at in expiry.items() if at - now < self.lifetime_s / 2]

    def rotate_due(self, now: float) -> list[str]:
        """Renew every key past half its lifetime; returns the kinds renewed."""
        renewed = []
        for kind in self.due(now):
            try:
                self.api.rotate_token(kind)
            except ManagementError as error:
                self.last_error = f"could not rotate the {kind} key: {error}"
                logger.error(self.last_error)
                continue
            self.rotations[kind] += 1
            renewed.append(kind)
            logger.info("rotated the %s key (rotation %d)", kind, self.rotations[kind])
        return renewed
