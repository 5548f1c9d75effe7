"""The gateway's client tokens (guard/client_auth.py) read as Kubernetes mounts a Secret and as a
plain file: rotation by the kubelet's atomic swap, revocation, unusable tokens named, fail closed.
The end-to-end proof (one token for two replicas, through real TorchServes) is in
tests/test_e2e_replicas.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc

from guard.client_auth import (
    MISSING_TOKEN, WRONG_TOKEN, ClientTokenAdmission, ClientTokens, PassThrough, admission_from_args,
)
from morph_protocol.keyfile import TokenSource

TOKEN_A = "a" * 24 + "-client-a"
TOKEN_B = "b" * 24 + "-client-b"


def mount_secret(root: Path, data: dict[str, str], generation: int) -> None:
    """What the kubelet does for a Secret volume: the files in a timestamped directory, `..data`
    a symlink to it (swapped by rename, atomically), and one symlink per key into `..data`."""
    version = root / f"..2026_12_02_00_00_{generation:02d}.000000001"
    version.mkdir(parents=True)
    for key, value in data.items():
        (version / key).write_text(value)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(version.name)
    os.replace(tmp_link, root / "..data")
    for key in data:
        link = root / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")
    for link in root.iterdir():
        if link.is_symlink() and not link.name.startswith(".") and link.name not in data:
            link.unlink()


class Context:
    """The part of grpc.ServicerContext the admission reads."""

    def __init__(self, authorization: str | None) -> None:
        self.metadata = [] if authorization is None else [("authorization", authorization)]

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("user-agent", "test"), *self.metadata]


def test_a_mounted_secret_is_read_and_its_rotation_picked_up(tmp_path: Path) -> None:
    secret = tmp_path / "client-tokens"
    mount_secret(secret, {"client-a": TOKEN_A + "\n"}, 1)
    tokens = ClientTokens(secret, recheck_s=0.0)
    assert tokens.current() == (TOKEN_A.encode(),) and tokens.problems == ()
    assert tokens.admits(TOKEN_A) and not tokens.admits(TOKEN_B) and not tokens.admits(TOKEN_A[:-1])

    mount_secret(secret, {"client-a": TOKEN_A, "client-b": TOKEN_B}, 2)  # overlap while clients move
    assert tokens.admits(TOKEN_A) and tokens.admits(TOKEN_B)
    mount_secret(secret, {"client-b": TOKEN_B}, 3)  # the old one revoked
    assert not tokens.admits(TOKEN_A) and tokens.admits(TOKEN_B)
    assert tokens.loads == 3


def test_changes_are_checked_at_most_once_per_recheck_interval(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(TOKEN_A + "\n")
    tokens = ClientTokens(path, recheck_s=0.3)
    assert tokens.admits(TOKEN_A)
    path.write_text(TOKEN_B + "\n")
    assert tokens.admits(TOKEN_A)  # within the interval: the set read last
    time.sleep(0.35)
    assert tokens.admits(TOKEN_B) and not tokens.admits(TOKEN_A)


def test_a_token_file_skips_comments_and_names_unusable_lines(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(f"# clients of the morph service\n\n{TOKEN_A}\nshort\n{TOKEN_B}  \nhas a space in it too\n")
    tokens = ClientTokens(path, recheck_s=0.0)
    assert tokens.current() == (TOKEN_A.encode(), TOKEN_B.encode())
    assert tokens.problems == (
        "tokens.txt line 4: unusable token (needs 16+ characters, no spaces)",
        "tokens.txt line 6: unusable token (needs 16+ characters, no spaces)",
    )


def test_a_missing_or_empty_source_admits_nobody_and_says_why(tmp_path: Path) -> None:
    missing = ClientTokens(tmp_path / "absent", recheck_s=0.0)
    assert missing.current() == () and not missing.admits(TOKEN_A)
    assert missing.problems[0].startswith(f"cannot read {tmp_path / 'absent'}: No such file")
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    nobody = ClientTokens(empty, recheck_s=0.0)
    assert nobody.current() == () and nobody.problems == (f"no tokens in {empty}",)


def test_admission_refuses_absent_wrong_and_malformed_tokens_and_sends_its_own_key(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(TOKEN_A + "\n")
    key_file = tmp_path / "key_file.json"
    key_file.write_text('{"inference": {"key": "torchserve-inference-key"}, "management": {"key": "m"}}')
    admission = admission_from_args(str(path), key_file)
    assert isinstance(admission, ClientTokenAdmission)
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert admission.refusal(Context(None), "Predictions") == (unauthenticated, MISSING_TOKEN)
    assert admission.refusal(Context("Bearer "), "StreamPredictions") == (unauthenticated, MISSING_TOKEN)
    assert admission.refusal(Context(f"Basic {TOKEN_A}"), "ModelInfer") == (unauthenticated, MISSING_TOKEN)
    assert admission.refusal(Context(f"Bearer {TOKEN_B}"), "Predictions") == (unauthenticated, WRONG_TOKEN)
    assert admission.refusal(Context(f"bearer {TOKEN_A}"), "Predictions") is None
    assert admission.refusal(Context(None), "Ping") is None  # health checks carry no data
    assert admission.status()["refused_calls"] == 4
    # TorchServe gets its own key, never the client's.
    assert admission.upstream_metadata(Context(f"Bearer {TOKEN_A}")) == [
        ("authorization", "Bearer torchserve-inference-key")]
    assert "torchserve-inference-key" not in str(admission.status()) and TOKEN_A not in str(admission.status())


def test_the_guards_own_key_ignores_the_client_token_env_var(tmp_path: Path, monkeypatch) -> None:
    key_file = tmp_path / "key_file.json"
    key_file.write_text('{"inference": {"key": "own-key"}}')
    monkeypatch.setenv("DIFFMORPHER_TOKEN", TOKEN_A)  # set for a client in the same pod
    assert TokenSource(key_file=key_file, use_env=False).get() == "own-key"
    assert TokenSource(key_file=key_file).get() == TOKEN_A


def test_without_client_tokens_the_clients_header_goes_upstream() -> None:
    admission = admission_from_args(None, Path("key_file.json"))
    assert isinstance(admission, PassThrough)
    assert admission.refusal(Context(None), "Predictions") is None
    assert admission.upstream_metadata(Context("Bearer k")) == [("authorization", "Bearer k")]
