"""Benchmark fixtures (cached models, the shared input) and the end-of-run summary.

Run: python -m pytest benchmarks/ --benchmark-only -s   (full size: ~40 min on 2 CPU cores)
     python -m pytest benchmarks/ --benchmark-only --bench-model tiny   (a minute: smoke run)

Each test stores what it measured in RESULTS; the summary at the end prints the derived numbers
(ratios ours/reference from this one run, achieved GFLOP/s) and writes them as JSON to
<cache>/results/latest.json (see bench_cache.py for the cache).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_cache  # noqa: E402

#: what the tests measured, by test family; summarised at the end of the session
RESULTS: dict = {}
N_BOXES = 32  # >= 30 prompts on the 512 x 512 image: the decoder load of a typical field


def pytest_addoption(parser):
    parser.addoption("--bench-model", default="full", choices=("full", "tiny"),
                     help="model size for the benchmarks (tiny: a quick smoke run)")


@pytest.fixture(scope="session")
def bench_config(request) -> str:
    """'full' (CellSAM ViT-B sizes, random weights) or 'tiny'."""
    return request.config.getoption("--bench-model")


@pytest.fixture(scope="session")
def checkpoint(bench_config) -> Path:
    """The random-weight checkpoint the model directory was exported from."""
    return bench_cache.checkpoint(bench_config)


@pytest.fixture(scope="session")
def model_dir(bench_config) -> Path:
    """The cached exported model directory (FP32 + FP16)."""
    return bench_cache.model_dir(bench_config)


@pytest.fixture(scope="session")
def threads() -> int:
    """Threads for both sides: every usable core."""
    return len(os.sched_getaffinity(0))


@pytest.fixture(scope="session")
def image_512(tmp_path_factory):
    """The synthetic 512 x 512 image of N_BOXES cells, its TIFF path and the cells' boxes."""
    import tifffile
    from cellsam_rt.tools.bench import synthetic_cells

    image, boxes = synthetic_cells(512, N_BOXES, seed=0)
    path = tmp_path_factory.mktemp("img") / "synthetic512.tif"
    tifffile.imwrite(path, image)
    return {"image": image, "path": path, "boxes": boxes}


def record(family: str, name: str, value) -> None:
    """Store a measurement for the end-of-run summary."""
    RESULTS.setdefault(family, {})[name] = value


def median(values) -> float:
    """Median of a list of numbers, as a float."""
    return float(np.median(np.asarray(values, dtype=np.float64)))


# ------------------------------------------------------------------------------- summary

def _groups(runs: list[dict], groups: dict) -> dict:
    from cellsam_rt.tools.bench import grouped
    return grouped(runs, groups)


def _e2e_summary(e2e: dict) -> tuple[list[str], dict]:
    from cellsam_rt.tools.bench import OUR_GROUPS, REFERENCE_GROUPS

    lines, out = [], {}
    ref = e2e.get("reference")
    sides = {k: _groups(v["runs"], OUR_GROUPS) for k, v in e2e.items() if k != "reference"}
    if ref:
        sides["reference"] = _groups(ref["runs"], REFERENCE_GROUPS)
    names = list(dict.fromkeys(n for s in sides.values() for n in s))
    header = f"{'stage':<12}" + "".join(f"{k:>14}" for k in sides)
    if ref:
        header += "".join(f"{'ref/' + k:>16}" for k in sides if k != "reference")
    lines.append(header)
    for n in names:
        row = f"{n:<12}" + "".join(f"{sides[k].get(n, float('nan')):>14.3f}" for k in sides)
        if ref:
            for k in sides:
                if k != "reference":
                    o, r = sides[k].get(n), sides["reference"].get(n)
                    row += f"{(r / o if o and r else float('nan')):>15.2f}x"
        lines.append(row)
    out["median_seconds"] = sides
    if ref:
        out["speedup_vs_reference"] = {
            k: {n: sides["reference"][n] / sides[k][n] for n in sides[k]
                if n in sides["reference"] and sides[k][n] > 0}
            for k in sides if k != "reference"}
    return lines, out


def _gflops_summary(results: dict) -> tuple[list[str], dict]:
    """Achieved GFLOP/s per stage from the e2e medians and the counted FLOPs, vs SGEMM peak."""
    flops = results.get("flops", {}).get("model")
    peak = results.get("flops", {}).get("sgemm")
    e2e = results.get("e2e", {})
    if not flops or not e2e:
        return [], {}
    lines, out = [], {}
    per_stage = {"encoder": flops["encoder_gflop"], "cellfinder": flops["cellfinder_gflop"],
                 "decoder": flops["decoder_gflop_per_box"] * N_BOXES}
    peak_g = peak["best_gflops"] if peak else None
    lines.append(f"{'side':<12}{'stage':<12}{'GFLOP':>10}{'median s':>11}{'GFLOP/s':>10}"
                 + (f"{'% of sgemm':>12}" if peak_g else ""))
    for side, data in e2e.items():
        for stage, gflop in per_stage.items():
            key = "masks" if side == "reference" and stage == "decoder" else stage
            vals = [r.get(key) for r in data["runs"] if r.get(key) is not None]
            if not vals:
                continue
            sec = median(vals)
            rate = gflop / sec
            out.setdefault(side, {})[stage] = {"gflop": gflop, "seconds": sec, "gflops": rate}
            lines.append(f"{side:<12}{stage:<12}{gflop:>10.1f}{sec:>11.3f}{rate:>10.1f}"
                         + (f"{100 * rate / peak_g:>11.0f}%" if peak_g else ""))
    return lines, out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    tr = terminalreporter
    summary: dict = {"raw": RESULTS}
    from cellsam_rt.tools.bench import cpu_info, load_average, package_versions
    summary["machine"] = cpu_info()
    summary["load_average_end"] = load_average()
    summary["software"] = package_versions(with_torch=True)
    summary["model"] = config.getoption("--bench-model")
    tr.section("cellsam-rt benchmark summary")
    tr.write_line(f"machine: {summary['machine']}; load average at end "
                  f"{summary['load_average_end']}")
    if "e2e" in RESULTS:
        lines, out = _e2e_summary(RESULTS["e2e"])
        summary["e2e"] = out
        tr.write_line(f"end to end, 512x512, {N_BOXES} prompt boxes (median s; speed-up = "
                      "reference / ours)")
        for line in lines:
            tr.write_line("  " + line)
    lines, out = _gflops_summary(RESULTS)
    if lines:
        summary["gflops"] = out
        tr.write_line("achieved GFLOP/s (counted MatMul/Conv/Einsum FLOPs / median stage time)")
        for line in lines:
            tr.write_line("  " + line)
    for family in ("attention", "trunks", "decoder_scaling", "image_size", "post_decoder"):
        if family in RESULTS:
            tr.write_line(f"{family}:")
            for name, value in RESULTS[family].items():
                tr.write_line(f"  {name}: {json.dumps(value, default=float)[:400]}")
    out_dir = bench_cache.cache_dir() / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(summary, indent=2, default=float)
    (out_dir / f"{summary['model']}-{stamp}.json").write_text(text)
    (out_dir / f"latest-{summary['model']}.json").write_text(text)
    tr.write_line(f"results written to {out_dir / ('latest-' + summary['model'] + '.json')}")
