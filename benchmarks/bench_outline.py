#!/usr/bin/env python3
"""What redrawing outlines in the image (`--outline contrast`) costs, per image of a folder.

    python benchmarks/bench_outline.py --images DIR [--repeat 3] [--csv out.csv]

Per single-channel image: cells found, the outline stage's own time (the median of its timer over
the repeats) and the median segmentation time with `--outline contrast` against `--outline model`,
run alternately in one process; the ratio is the stage's cost.
"""
from __future__ import annotations

import sys

import numpy as np

from bench_diameter import single_channel_images, timed_segment, timing_args, write_rows


def main() -> int:
    from cellsam_rt.pipeline.segmenter import Segmenter

    args = timing_args(__doc__)
    segs = {name: Segmenter("default", threads=args.threads, outline=name)
            for name in ("model", "contrast")}
    rows = []
    for path, image in single_channel_images(args.images):
        t_model, _, _ = timed_segment(segs["model"], image, args.repeat)
        t_contrast, t_stage, cells = timed_segment(segs["contrast"], image, args.repeat,
                                                  "outline")
        rows.append({"image": path.stem, "cells": cells, "seconds_model": t_model,
                     "seconds_contrast": t_contrast, "seconds_outline": t_stage,
                     "ratio": t_contrast / t_model})
        r = rows[-1]
        print(f"{path.stem[:40]:40s} {cells:5d} cells  model {t_model:6.2f} s  contrast "
              f"{t_contrast:6.2f} s (outline {t_stage:5.3f} s)  ratio {r['ratio']:5.2f}", flush=True)
    if rows:
        print(f"median ratio {np.median([r['ratio'] for r in rows]):.2f}; outline stage "
              f"{1e3 * sum(r['seconds_outline'] for r in rows) / sum(r['cells'] for r in rows):.2f}"
              f" ms per cell")
    if args.csv:
        write_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
