"""Spot assignment at scale: N spots on a square label image of disk cells (default 10M, 10k).

    python benchmarks/bench_spots.py [--spots 10000000] [--size 10000] [--expand 2]
                                     [--csv] [--compare-whole] [--out DIR]

Prints the wall time, the CPU time (all threads; less sensitive to a busy machine) and the peak
resident memory (RSS, sampled every 5 ms) of each phase: reading the table, checking it
(coordinates, gene codes), expansion (tiled), assignment (the lookup), cell statistics + count
matrix, and writing each output. --compare-whole also times scikit-image's expand_labels on the
whole image at once (memory heavy), --csv writes the spots table as CSV as well as Parquet.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import skimage.segmentation  # noqa: F401 - imported before the clock starts (~1.5 s)
from cellsam_rt.io import atomic_write
from cellsam_rt.workflows.spot_assignment import (
    assign_labels,
    assign_spots,
    expand_labels,
    label_stats,
    prepare_spots,
)
from cellsam_rt.workflows.spots import (
    write_counts_csv,
    write_frame_csv,
    write_spot_outputs,
)

PROC = psutil.Process()


@contextmanager
def phase(name: str, results: list):
    """Time a phase and sample its peak RSS on a thread."""
    peak = [PROC.memory_info().rss]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], PROC.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0, c0 = time.perf_counter(), PROC.cpu_times()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        c1 = PROC.cpu_times()
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        stop.set()
        thread.join()
        peak[0] = max(peak[0], PROC.memory_info().rss)
        results.append((name, seconds, cpu, peak[0] / 2**30))
        print(f"{name:<34} {seconds:8.2f} s wall {cpu:8.2f} s CPU   peak RSS "
              f"{peak[0] / 2**30:6.2f} GiB", flush=True)


def disk_grid(size: int, spacing: int = 32, radius: float = 13.0) -> np.ndarray:
    """uint32 labels: one disk per spacing x spacing square, ids row by row from 1."""
    ys = np.arange(size)
    cy, cx = ys // spacing, ys % spacing - spacing / 2 + 0.5
    per_row = -(-size // spacing)
    inside = (cx[:, None] ** 2 + cx[None, :] ** 2) < radius ** 2
    labels = (cy[:, None] * per_row + cy[None, :] + 1).astype(np.uint32)
    labels[~inside] = 0
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=10_000_000)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=300)
    parser.add_argument("--expand", type=float, default=2.0)
    parser.add_argument("--csv", action="store_true", help="also write the spots table as CSV")
    parser.add_argument("--compare-whole", action="store_true",
                        help="also expand the whole image in one expand_labels call")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_spots_"))
    out.mkdir(parents=True, exist_ok=True)
    results: list = []
    rng = np.random.default_rng(0)

    labels = disk_grid(args.size)
    genes = np.array([f"GENE{i:04d}" for i in range(args.genes)], dtype=object)
    table = pd.DataFrame({"x": rng.uniform(-0.5, args.size - 0.5, args.spots),
                          "y": rng.uniform(-0.5, args.size - 0.5, args.spots),
                          "gene": genes[rng.integers(0, args.genes, args.spots)],
                          "qv": rng.uniform(20, 40, args.spots).astype(np.float32)})
    src = out / "spots_in.parquet"
    table.to_parquet(src, index=False)
    del table
    print(f"{args.spots} spots, {args.size}x{args.size} labels, "
          f"{int(labels.max())} cells, {args.genes} genes; out {out}")

    with phase("read parquet", results):
        table = pd.read_parquet(src)
    with phase("check table + gene codes", results):
        spots = prepare_spots(table, src)
    with phase(f"expand {args.expand:g} px (tiled)", results):
        grown = expand_labels(labels, args.expand)
    if args.compare_whole:
        from skimage.segmentation import expand_labels as whole

        with phase(f"expand {args.expand:g} px (whole image)", results):
            same = whole(labels, args.expand)
        print(f"  tiled == whole: {np.array_equal(same, grown)}")
        del same
    with phase("assign (lookup only)", results):
        assign_labels(grown, spots.row, spots.col)
    with phase("label stats (areas, centroids)", results):
        label_stats(grown)
    with phase("assign_spots (lookup+stats+matrix)", results):
        result = assign_spots(grown, spots, src)
    print(f"  {result.summary}")
    with phase("write parquet + h5ad (no CSV)", results):
        write_spot_outputs(result, out, "bench", parquet=True, counts_csv=False)
    with phase("write counts CSV (dense)", results):
        atomic_write(out / "bench_counts.csv", lambda fh: write_counts_csv(fh, result))
    if args.csv:
        with phase("write spots CSV", results):
            atomic_write(out / "bench_spots.csv", lambda fh: write_frame_csv(fh, result.spots))
    sizes = {p.name: p.stat().st_size / 2**20 for p in sorted(out.iterdir())}
    print("files: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in sizes.items()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"process peak RSS (getrusage): {peak:.2f} GiB")
    if args.out is None:
        for p in out.iterdir():
            os.unlink(p)
        out.rmdir()


if __name__ == "__main__":
    main()
