#!/usr/bin/env python3
"""What the noise check (`--denoise gaussian`) costs, per image of a folder.

    python benchmarks/bench_denoise.py --images DIR [--repeat 3] [--csv out.csv]

Per single-channel image: whether it is noisy enough to be a candidate for smoothing, whether
the detector took the smoothed view, cells found, and the median segmentation time with
`--denoise gaussian` against `--denoise off`, run alternately in one process; the ratio is the
check's cost (and, for a smoothed image, that of the other reading).
"""
from __future__ import annotations

import sys

import numpy as np

from bench_diameter import single_channel_images, timed_segment, timing_args, write_rows


def main() -> int:
    from cellsam_rt.pipeline.segmenter import Segmenter
    from cellsam_rt.stages.denoise import denoised

    args = timing_args(__doc__)
    segs = {name: Segmenter("default", threads=args.threads, denoise=name)
            for name in ("off", "gaussian")}
    rows = []
    for path, image in single_channel_images(args.images):
        candidate = denoised(image) is not None
        views = [segs[name].prepare(image).view for name in ("off", "gaussian")]
        smoothed = views[1] is not None and (views[0] is None
                                             or not np.array_equal(views[0], views[1]))
        t_off, _, _ = timed_segment(segs["off"], image, args.repeat)
        t_on, _, cells = timed_segment(segs["gaussian"], image, args.repeat)
        rows.append({"image": path.stem, "candidate": candidate, "smoothed": smoothed,
                     "cells": cells, "seconds_off": t_off, "seconds_gaussian": t_on,
                     "ratio": t_on / t_off})
        print(f"{path.stem[:40]:40s} {'candidate' if candidate else 'clean':9s} "
              f"{'smoothed' if smoothed else 'as given':8s} {cells:5d} cells  off {t_off:6.2f} s"
              f"  gaussian {t_on:6.2f} s  ratio {t_on / t_off:5.2f}", flush=True)
    for kind, keep in (("clean", lambda r: not r["candidate"]),
                       ("candidates", lambda r: r["candidate"])):
        part = [r["ratio"] for r in rows if keep(r)]
        if part:
            print(f"{kind}: {len(part)} images, median ratio {np.median(part):.2f}")
    if args.csv:
        write_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
