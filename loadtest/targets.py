"""The servers a load run aims at, and which simulated user goes to which.

A target is one replica: its gRPC address (the guard's gateway), its REST base URL and the key
file its tokens come from. Its name is the gRPC address; samples, the ledger and the report key
per-target numbers by it. Plain values, no Locust: the runner, the locustfile and the tests all
use this module.

Users spread round-robin over the targets, offset by the Locust worker's index: user k of
worker w goes to target (w + k) mod T. Locust hands the users of a stage out to its workers in
turn, so with W workers and T targets every target gets an equal share (+-1) at every stage,
and with two workers and two targets each worker talks to both replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class TargetError(ValueError):
    """The target list is unusable (mismatched lengths, a non-loopback address)."""


@dataclass(frozen=True)
class Target:
    grpc: str  # host:port of the gRPC inference endpoint (the guard's gateway)
    rest_url: str  # http://host:port of TorchServe's REST inference API
    key_file: str  # TorchServe's key_file.json ("" = no token auth)

    @property
    def name(self) -> str:
        return self.grpc

    def check_loopback(self) -> None:
        """This test generates load: it may only ever aim at this machine."""
        check_loopback(self.grpc.rsplit(":", 1)[0].strip("[]"), f"gRPC target {self.grpc!r}")
        check_loopback(urlsplit(self.rest_url).hostname or "", f"REST URL {self.rest_url!r}")


def check_loopback(host: str, what: str) -> None:
    if host not in LOOPBACK_HOSTS:
        raise TargetError(f"{what} must be a loopback address, got host {host!r}")


def split_list(values: str | list[str] | None) -> list[str]:
    """Items given as repeated options and/or comma-separated: ["a,b", "c"] -> ["a", "b", "c"]."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def per_target(values: list[str], count: int, what: str) -> list[str]:
    """One value per target: a single value serves all of them, otherwise the counts must match."""
    if len(values) == count:
        return values
    if len(values) == 1:
        return values * count
    raise TargetError(f"{count} targets but {len(values)} {what} values: give one, or one per target")


def build_targets(grpc: list[str], rest: list[str], key_files: list[str]) -> list[Target]:
    """Targets from parallel lists (REST URLs: one per target; key files: one, or one per target)."""
    if not grpc:
        raise TargetError("no gRPC target given")
    if len(set(grpc)) != len(grpc):
        raise TargetError(f"a gRPC target is listed twice: {grpc}")
    if len(rest) != len(grpc):
        raise TargetError(f"{len(grpc)} gRPC targets but {len(rest)} REST URLs: give one per target")
    keys = per_target(key_files or [""], len(grpc), "key file")
    targets = [Target(g, r, k) for g, r, k in zip(grpc, rest, keys)]
    for target in targets:
        target.check_loopback()
    return targets


def target_index(user_index: int, worker_index: int, count: int) -> int:
    """Which of `count` targets user `user_index` (in start order) of worker `worker_index` uses."""
    return (max(worker_index, 0) + user_index) % count
