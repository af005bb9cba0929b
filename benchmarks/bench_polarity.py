#!/usr/bin/env python3
"""What `--polarity auto` decides for each image of a folder, and what the decision costs.

    python benchmarks/bench_polarity.py --images DIR [--repeat 3] [--csv out.csv]

Per single-channel image: its skewness (the gate), whether auto inverts it, and the median
segmentation time with auto against the same image with the decision given (`bright` or `dark`),
run alternately in one process; the ratio is the check's cost.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from bench_diameter import single_channel_images, timing_args, write_rows


def _seconds(seg, image, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        seg.segment(image)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> int:
    from cellsam_rt.pipeline import polarity
    from cellsam_rt.pipeline.segmenter import Segmenter

    args = timing_args(__doc__)
    segs = {name: Segmenter("default", threads=args.threads, polarity=name)
            for name in ("auto", "bright", "dark")}
    rows = []
    for path, image in single_channel_images(args.images):
        inverts = polarity.orient(segs["auto"], image) is not None
        given = segs["dark" if inverts else "bright"]
        t_given = _seconds(given, image, args.repeat)
        t_auto = _seconds(segs["auto"], image, args.repeat)
        rows.append({"image": path.stem, "skewness": polarity.skewness(image), "inverted": inverts,
                     "seconds_given": t_given, "seconds_auto": t_auto, "ratio": t_auto / t_given})
        r = rows[-1]
        print(f"{path.stem[:40]:40s} skew {r['skewness']:6.2f}  {'inverted' if inverts else 'as given':8s}"
              f"  given {t_given:6.2f} s  auto {t_auto:6.2f} s  ratio {r['ratio']:5.2f}", flush=True)
    for flag in (False, True):
        sel = [r["ratio"] for r in rows if r["inverted"] == flag]
        if sel:
            print(f"{'inverted' if flag else 'as given'}: {len(sel)} images, median ratio "
                  f"{np.median(sel):.2f}")
    if args.csv and rows:
        write_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
