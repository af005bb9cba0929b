#!/usr/bin/env python3
"""The automatic diameter estimate (`Segmenter.estimate_diameter`, what `--tile auto` measures)
against the true median diameter of labelled images.

    python benchmarks/bench_diameter.py --images DIR --truth DIR [--csv out.csv]

The true diameter of an object is that of the disc of its area; an image's is the median over its
objects. Prints one row per image (true, estimated, ratio) and how many lie within 25 %.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def true_diameter(labels: np.ndarray) -> float:
    areas = np.bincount(np.asarray(labels, np.int64).ravel())[1:]
    areas = areas[areas > 0]
    return float(np.median(np.sqrt(4 * areas / np.pi))) if areas.size else float("nan")


def write_rows(path: Path, rows: list[dict]) -> None:
    """The rows as a CSV file with a header (the first row's keys)."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def timing_args(doc: str):
    """The options of the per-image timing benchmarks: --images, --threads, --repeat, --csv."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--csv", type=Path, default=None)
    return p.parse_args()


def timed_segment(seg, image, repeat: int, stage: str = "") -> tuple[float, float, int]:
    """(median seconds, median seconds of the timer `stage`, cells) of `repeat` segmentations."""
    import time

    times, stage_times, cells = [], [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = seg.segment(image)
        times.append(time.perf_counter() - t0)
        stage_times.append(result.timings.get(stage, 0.0))
        cells = len(result.label_ids)
    return float(np.median(times)), float(np.median(stage_times)), cells


def single_channel_images(folder: Path):
    """(path, image) for each single-channel TIFF of a folder, by name."""
    import tifffile

    for path in sorted(folder.glob("*.tif")):
        image = tifffile.imread(path)
        if image.ndim == 2:
            yield path, image


def main() -> int:
    import tifffile

    from cellsam_rt.pipeline.segmenter import Segmenter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--truth", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()
    seg = Segmenter("default", threads=args.threads)
    rows = []
    for path in sorted(args.images.glob("*.tif")):
        truth = tifffile.imread(args.truth / path.name)
        d_true = true_diameter(truth)
        d_est = seg.estimate_diameter(tifffile.imread(path))
        ratio = d_est / d_true
        rows.append({"image": path.stem, "true": d_true, "estimated": d_est, "ratio": ratio})
        print(f"{path.stem[:44]:44s} true {d_true:6.1f}  estimated {d_est:6.1f}  ratio {ratio:5.2f}",
              flush=True)
    ok = [abs(r["ratio"] - 1) <= 0.25 for r in rows if np.isfinite(r["ratio"])]
    print(f"within 25 %: {sum(ok)} of {len(rows)}")
    if args.csv:
        write_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
