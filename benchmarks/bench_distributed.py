#!/usr/bin/env python3
"""Images/s of `cellsam-rt run` in one process against `--scheduler local:1` and `local:2`
(Dask LocalClusters of worker processes), on 24 image files.

    python benchmarks/bench_distributed.py [--size 256] [--images 24] [--rounds 1] [--json out.json]

The images are crops of the DSB 2018 nuclei image (tests/data/stardist/img2d.tif). Every mode is a
real `python -m cellsam_rt.cli run` process writing the same outputs to a fresh folder, so process
start, cluster start and model loading (once per worker process) count where the user pays them.
ONNX Runtime threads: the single process uses all cores; a LocalCluster of N workers gives each
worker cores // N threads so that the machine is not oversubscribed. Modes alternate per round so
that load drift on a shared machine hits all alike; the median per mode is reported. On a machine
with few cores the workers compete for the same cores as one process would use: the figure shows
the overhead of the distributed path more than its scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "workflows"))


def make_images(folder: Path, n: int, size: int) -> Path:
    import tifffile
    from screening_helpers import nuclei

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tifffile.imwrite(folder / f"img{i:02d}.tif", nuclei(size, i)[..., 0])
    return folder


def run_once(images: Path, out: Path, extra: list[str]) -> float:
    """Wall seconds of one `cellsam-rt run` process; fails loudly on a non-zero exit."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cellsam_rt.cli", "run", str(images), "--out",
                        str(out), "--quiet", *extra], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"run {' '.join(extra)} failed:\n{r.stderr}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    cores = os.cpu_count() or 1
    modes = {
        "single process": ["--threads", str(cores)],
        "local:1": ["--scheduler", "local:1", "--threads", str(cores)],
        "local:2": ["--scheduler", "local:2", "--threads", str(max(1, cores // 2))],
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp) / "in", a.images, a.size)
        for _ in range(a.rounds):
            for mode, extra in modes.items():
                times[mode].append(run_once(images, Path(tmp) / "out", extra))
    base = statistics.median(times["single process"])
    rows = []
    for mode, ts in times.items():
        med = statistics.median(ts)
        rows.append({"mode": mode, "options": modes[mode], "seconds": med,
                     "images_per_s": a.images / med, "speedup": base / med})
        print(f"{mode:15s} {med:7.2f} s  {a.images / med:6.2f} images/s  x{base / med:.2f}")
    if a.json:
        a.json.write_text(json.dumps({"images": a.images, "size": a.size, "cores": cores,
                                      "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
