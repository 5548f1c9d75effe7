"""The short soak (`make soak` runs 30 minutes): 3 minutes of mixed good and hostile requests on
a server whose tokens expire every minute. Every request must get its expected answer across
several key rotations (no operator), and worker memory and file descriptors must show no trend.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability.send import Endpoints
from reliability.soak import run_soak, server_pids, write_report
from launcher.torchserve import TorchServeProcess

pytestmark = pytest.mark.slow

SOAK_S = 190  # over 3 minutes: the 1-minute keys expire three times


def test_three_minutes_of_mixed_traffic_across_token_expiry(tmp_path_factory: pytest.TempPathFactory,
                                                             model_store: Path) -> None:
    root = tmp_path_factory.mktemp("soak")
    with TorchServeProcess(root / "server", model_store, overrides={"token_expiration_min": "1"}) as server:
        first_key = server.key()
        endpoints = Endpoints(server.grpc_target, server.url("inference", ""), server.key_file)
        report = run_soak(endpoints, server_pids(server), SOAK_S, sample_every_s=5, log=print)
        status = server.health("/status")[1]
        last_key = server.key()
    write_report(report, root / "report")
    print((root / "report" / "soak.md").read_text())
    print(f"token rotations: {status['token_rotations']}, repairs: {status['repairs']}")
    assert report.requests > 100 and report.good >= 30
    assert report.good_ok == report.good
    assert not report.mismatches, report.mismatches[:10]
    # Keys live 60 s and are renewed at half-life: at least 5 renewals of each in 190 s.
    assert status["token_rotations"]["inference"] >= 5 and status["token_rotations"]["management"] >= 5
    assert last_key != first_key
    assert len(report.worker_pids) == 1 and not status["repairs"]  # one worker throughout
    worker = report.trends["worker"]
    # No trend: fds flat; RSS grows less than 32 MiB over the second half (allocator noise is a
    # few MiB; a leak of one frame per request would be tens of MiB).
    assert abs(worker["fds_last"] - worker["fds_first"]) <= 2, worker
    assert worker["rss_growth_second_half_mib"] < 32, worker
