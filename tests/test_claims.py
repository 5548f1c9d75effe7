"""Numbers in README.md, docs/ and code comments against the committed result files they cite
(benchmarks/results/): one number per claim, and each one that file's. A rerun that changes a
result and leaves the prose, or prose edited without a run, fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from benchmarks import ablation
from tests.markdown import markdown_table

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
README = REPO_ROOT / "README.md"
BENCH_RUN = "bench-20261202T065428Z.json"  # the five-pair run the speed and quality claims cite
# Every place that states the `fast` preset's speed-up.
FAST_CLAIMS = (README, REPO_ROOT / "docs" / "quality.md", REPO_ROOT / "diffmorpher" / "config.py")
DOCS = (README, REPO_ROOT / "deploy" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")))


def bench_summary(name: str = BENCH_RUN) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())["summary"]


def percent(fraction: float) -> str:
    """-0.1422 -> '-14 %', -0.0328 -> '-3.3 %' (two significant digits, as the prose writes them)."""
    value = fraction * 100
    return f"{value:.0f} %" if abs(value) >= 10 else f"{value:.1f} %"


def test_the_fast_presets_speed_up_is_one_number_the_cited_run_measured() -> None:
    summary = bench_summary()
    speedup = f"{summary['ratios']['baseline_over_fast']:.1f}x"
    assert speedup == "5.5x"
    quality = summary["quality_vs_baseline"]["fast"]
    for path in FAST_CLAIMS:
        text = " ".join(path.read_text().split())  # prose and comments wrap anywhere
        assert speedup in text and BENCH_RUN in text, path
        for stale in ("about 7x", "4-5x", "6.9x the baseline"):
            assert stale not in text, (path, stale)
    config = " ".join((REPO_ROOT / "diffmorpher" / "config.py").read_text().replace("#", " ").split())
    claimed = f"{speedup} faster, PPL {percent(quality['ppl'])}, PDV {percent(quality['pdv'])}, " \
              f"endpoint PSNR {percent(quality['endpoint_psnr_db'])}"
    assert claimed in config, claimed
    readme = " ".join(README.read_text().split())
    assert f"baseline / fast **{speedup}**" in readme
    assert f"PPL {percent(quality['ppl'])}, PDV {percent(quality['pdv'])}, endpoint PSNR " \
           f"{percent(quality['endpoint_psnr_db'])}" in readme


def test_the_readme_benchmark_table_is_the_cited_runs_means() -> None:
    report = json.loads((RESULTS / BENCH_RUN).read_text())
    rows = markdown_table(README.read_text(), "| mode | wall s | LoRA |")
    labels = {"baseline": "baseline", "default_cold": "default, cold", "default_warm": "default, warm", "fast": "fast"}
    assert [row[0] for row in rows] == list(labels.values())
    for mode, row in zip(labels, rows):
        runs = [r for r in report["runs"] if r["mode"] == mode]
        mean = report["summary"]["modes"][mode]
        stages = [sum(r["stages_s"][stage] for r in runs) / len(runs) for stage in ("lora", "inversion", "frames", "reschedule")]
        expected = [f"{mean['wall_s']:.1f}", *(f"{value:.1f}" for value in stages), f"{mean['ppl']:.4f}",
                    f"{mean['pdv'] * 1000:.3f}", f"{mean['endpoint_psnr_db']:.2f}"]
        assert row[1:] == expected, (mode, row, expected)


def test_the_readme_peak_memory_is_each_modes_own_from_its_run() -> None:
    """The per-mode peak RSS (benchmarks/peak_memory.py) of the run the README cites for it."""
    readme = README.read_text()
    (name,) = set(re.findall(r"\[peak memory JSON\]\(benchmarks/results/(bench-\w+\.json)\)", readme))
    report = json.loads((RESULTS / name).read_text())
    assert {r["peak_rss_method"] for r in report["runs"]} == {"kernel"}
    rows = markdown_table(readme, "| mode | peak RSS MiB |")
    modes = report["summary"]["modes"]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (mode, f"{modes[mode]['peak_rss_mib']:.0f}", f"{modes[mode]['added_rss_mib']:.0f}") for mode in modes]


def test_the_ablation_table_is_its_committed_result_file() -> None:
    quality = (REPO_ROOT / "docs" / "quality.md").read_text()
    (name,) = set(re.findall(r"benchmarks/results/(ablation-[\w-]+\.json)", quality))
    report = json.loads((RESULTS / name).read_text())
    assert report["metric"] == "lpips-alex"
    assert ablation.table(report) in quality
    pairs = {row["pair"] for row in report["rows"]}
    assert all(len([r for r in report["rows"] if r["variant"] == v]) == len(pairs) for v in report["variants"])


def test_docs_state_no_line_counts() -> None:
    """A line count goes stale with the next edit (the handler was "about 200 lines" at 321)."""
    for path in DOCS:
        found = re.findall(r"~?\b\d+ lines\b", path.read_text())
        assert not found, (path, found)
