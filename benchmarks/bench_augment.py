#!/usr/bin/env python3
"""What test-time augmentation (`--augment flips`) costs, per image of a folder.

    python benchmarks/bench_augment.py --images DIR [--repeat 3] [--csv out.csv]

Per TIFF image: cells found and the median segmentation time with `--augment flips` against
`--augment off`, run alternately in one process, their ratio, and the seconds spent merging the
four views (the `augment` timer).
"""
from __future__ import annotations

import sys

import numpy as np

from bench_diameter import timed_segment, timing_args, write_rows


def main() -> int:
    import tifffile

    from cellsam_rt.pipeline.segmenter import Segmenter

    args = timing_args(__doc__)
    segs = {name: Segmenter("default", threads=args.threads, augment=name)
            for name in ("off", "flips")}
    rows = []
    for path in sorted(args.images.glob("*.tif")):
        image = tifffile.imread(path)
        t_off, _, n_off = timed_segment(segs["off"], image, args.repeat)
        t_on, t_merge, n_on = timed_segment(segs["flips"], image, args.repeat, stage="augment")
        rows.append({"image": path.stem, "pixels": int(image.shape[0] * image.shape[1]),
                     "cells_off": n_off, "cells_flips": n_on, "seconds_off": t_off,
                     "seconds_flips": t_on, "seconds_merge": t_merge, "ratio": t_on / t_off})
        print(f"{path.stem[:40]:40s} cells {n_off:5d} -> {n_on:5d}  off {t_off:6.2f} s  flips "
              f"{t_on:6.2f} s (merge {t_merge:5.2f} s)  ratio {t_on / t_off:5.2f}", flush=True)
    if rows:
        ratios = [r["ratio"] for r in rows]
        merge = [r["seconds_merge"] / r["seconds_flips"] for r in rows]
        print(f"{len(rows)} images: median ratio {np.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}); merging {np.median(merge):.1%} of the time")
    if args.csv:
        write_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
