"""One set of results from a distributed Locust run: the workers' samples and ledgers merged into
the `samples.jsonl` and `ledger.json` the report reads.

Each Locust worker writes `samples.worker<i>.jsonl` and `ledger.worker<i>.json`; the master
writes `ledger.master.json` (no requests of its own: its clock, which the step shape runs on, and
how the workers drained). Locust's own statistics need no merging: the master aggregates them
into its CSV. The merged ledger keeps each worker's totals under `workers`, so the report can
show that every worker sent requests and what became of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.outcomes import Ledger
from loadtest.scrape import read_samples


class MergeError(RuntimeError):
    """The run left no usable results (a worker or the master wrote nothing)."""


def worker_files(directory: Path, stem: str, suffix: str) -> dict[int, Path]:
    """{worker index: path} of `<stem>.worker<i><suffix>` files."""
    found = {}
    for path in directory.glob(f"{stem}.worker*{suffix}"):
        index = path.name[len(stem) + len(".worker"):-len(suffix)]
        if index.isdigit():
            found[int(index)] = path
    return dict(sorted(found.items()))


def merge_results(directory: Path, expected_workers: int) -> dict[str, Any]:
    """Write `samples.jsonl` and `ledger.json` from the per-process files; return the ledger."""
    master_file = directory / "ledger.master.json"
    if not master_file.is_file():
        raise MergeError(f"the Locust master wrote no {master_file.name}")
    master = json.loads(master_file.read_text())
    ledgers = {index: json.loads(path.read_text()) for index, path in worker_files(directory, "ledger", ".json").items()}
    if len(ledgers) != expected_workers:
        raise MergeError(f"{expected_workers} Locust workers were started, {len(ledgers)} wrote a ledger "
                         f"(found workers {sorted(ledgers)})")
    samples = []
    for path in worker_files(directory, "samples", ".jsonl").values():
        samples.extend(read_samples(path))
    samples.sort(key=lambda sample: sample["ts"])
    with (directory / "samples.jsonl").open("w") as sink:
        for sample in samples:
            sink.write(json.dumps(sample) + "\n")
    merged = Ledger.merge([Ledger.from_dict(ledger) for ledger in ledgers.values()])
    lags = [ledger.get("client_loop_lag") or {} for ledger in ledgers.values()]
    measured = [lag for lag in lags if lag.get("max_s") is not None]
    worst_lag = max(measured, key=lambda lag: lag["max_s"]) if measured else {"max_s": None, "p99_s": None}
    result = {
        **merged.to_dict(),
        # The step shape runs on the master's clock: stage windows are relative to its start.
        "started_wall": master["started_wall"],
        "stopped_wall": max([master["stopped_wall"], *(ledger["stopped_wall"] for ledger in ledgers.values())]),
        "profile": master["profile"],
        "schedule": master["schedule"],
        "targets": master["targets"],
        "client_loop_lag": worst_lag,  # the worst worker's
        "aborted": master.get("aborted") or next((w["aborted"] for w in ledgers.values() if w.get("aborted")), ""),
        "drain": master.get("drain"),
        "load_generator": {"mode": "distributed", "master": 1, "workers": len(ledgers)},
        "workers": [
            {"index": index, "totals": ledger["totals"], "by_target": ledger.get("by_target", {}),
             "client_loop_lag": ledger.get("client_loop_lag")}
            for index, ledger in ledgers.items()
        ],
    }  # fmt: skip
    (directory / "ledger.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
