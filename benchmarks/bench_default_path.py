#!/usr/bin/env python3
"""Mpx/s, F1@0.5 and peak memory of the default path (`cellsam-rt run` with default options and
the embedded model) on a 512² field, a ~2048² and a 6000² image, against the previous default
path in the same run.

    python benchmarks/bench_default_path.py [--sizes 512 2048 6000] [--gap 0] [--before]
                                            [--fields] [--compare MODEL_DIR] [--json out.json]

Images: the DSB 2018 nuclei image (tests/data/stardist/img2d.tif, 512², 125 labelled nuclei) and
mosaics of it (copies side by side, or --gap px apart on a zero background, cropped to the size),
so every copy has known labels. F1@0.5 is scored per copy and averaged ("all"), and again on the cells that do not
touch a copy's border ("interior": a copy's border cells are cut, and in a mosaic they sit against
the zero gap instead of the frame edge, which is not what tiling is measured for).

"after" is the default path now: scale-aware native tiles and the windowed mask decoder.
"before" (--before) is the previous default path, reproduced exactly by a copy of the default
model directory without `object_diameter` and `decoder_window` (the reference's tile gauge and
grid, the full-frame decoder). "16 fields" segments the 16 copies as separate images in one warm
process; "compare" (--compare) runs another model directory (e.g. an earlier default model) with
default options; "16 runs" (--runs) times 16 `cellsam-rt run` processes, one per copy, as a user would. Each case runs in a fresh process (peak RSS = that process's maximum resident set).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMG = REPO / "tests" / "data" / "stardist" / "img2d.tif"
MASK = REPO / "tests" / "data" / "stardist" / "mask2d.tif"
GAP = 16


def mosaic(size: int):
    """(image, truth, copy origins) of a mosaic of img2d cropped to size x size."""
    import tifffile

    img, gt = tifffile.imread(IMG), tifffile.imread(MASK)
    if size <= 512:
        return img[:size, :size], gt[:size, :size], [(0, 0)]
    step = 512 + GAP
    n = -(-size // step)
    image = np.zeros((size, size), img.dtype)
    truth = np.zeros((size, size), np.int32)
    origins = []
    for i in range(n):
        for j in range(n):
            y, x = i * step, j * step
            if y + 512 > size or x + 512 > size:
                continue  # only whole copies are scored; partial ones stay in the image
            origins.append((y, x))
    for i in range(n):
        for j in range(n):
            y, x = i * step, j * step
            h, w = min(512, size - y), min(512, size - x)
            image[y:y + h, x:x + w] = img[:h, :w]
            g = gt[:h, :w].astype(np.int32)
            truth[y:y + h, x:x + w] = np.where(g > 0, g + 1000 * (i * n + j), 0)
    return image, truth, origins


def scores(labels, truth, origins) -> dict:
    """Mean F1@0.5 over the copies, all cells and interior cells."""
    from skimage.segmentation import clear_border

    from cellsam_rt.tools.evaluate import evaluate

    f_all, f_in, iou = [], [], []
    for y, x in origins:
        p, t = labels[y:y + 512, x:x + 512], truth[y:y + 512, x:x + 512]
        e = evaluate(p, t)
        f_all.append(e["f1@0.5"])
        iou.append(e["mean_iou"])
        f_in.append(evaluate(clear_border(np.asarray(p, np.int64)),
                             clear_border(np.asarray(t, np.int64)))["f1@0.5"])
    return {"f1_all": float(np.mean(f_all)), "f1_interior": float(np.mean(f_in)),
            "mean_iou": float(np.mean(iou)), "copies": len(origins)}


def _case(queue, mode: str, size: int, model: str, threads: int, repeats: int, gap: int) -> None:
    from cellsam_rt.pipeline.segmenter import Segmenter

    global GAP
    GAP = gap
    image, truth, origins = mosaic(size)
    seg = Segmenter(model, threads=threads)
    seg.segment(image[:512, :512])  # sessions loaded, kernels warm
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        if mode == "16 fields":
            fields = [image[y:y + 512, x:x + 512] for y, x in origins[:16]]
            labels = np.zeros(image.shape, np.int32)
            for (y, x), f in zip(origins[:16], fields):
                labels[y:y + 512, x:x + 512] = seg.segment(f).labels
            timings, n_cells = {}, 0
        else:
            result = seg.segment(image)
            labels, timings, n_cells = result.labels, result.timings, result.n_cells
        times.append(time.perf_counter() - t0)
    out = {"mode": mode, "size": size, "seconds": float(np.median(times)),
           "mpx_per_s": image.size / 1e6 / float(np.median(times)), "cells": n_cells,
           "timings": {k: round(v, 4) for k, v in timings.items()},
           "decoder_share": (timings.get("decoder", 0.0) / timings["total"] if timings else None),
           "ms_per_cell_decoder": (1e3 * timings.get("decoder", 0.0) / n_cells
                                   if n_cells else None),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           **scores(labels, truth, origins[:16] if mode == "16 fields" else origins)}
    queue.put(out)


def run_case(mode: str, size: int, model: str, threads: int, repeats: int, gap: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(queue, mode, size, model, threads, repeats, gap))
    proc.start()
    import queue as queues

    while True:  # a case process that dies (out of memory, killed) must not hang the run
        try:
            out = queue.get(timeout=5)
            break
        except queues.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{mode} {size}: the case process died "
                                   f"(exit code {proc.exitcode})")
    proc.join()
    return out


def time_runs(tmp: Path, size: int, gap: int, threads: int) -> float:
    """Wall seconds of 16 `cellsam-rt run` processes, one per copy of the mosaic."""
    import subprocess

    import tifffile

    global GAP
    GAP = gap
    image, _, origins = mosaic(size)
    paths = []
    for k, (y, x) in enumerate(origins[:16]):
        paths.append(tmp / f"field{k:02d}.tif")
        tifffile.imwrite(paths[-1], image[y:y + 512, x:x + 512])
    t0 = time.perf_counter()
    for path in paths:
        subprocess.run([sys.executable, "-m", "cellsam_rt.cli", "run", str(path), "--out",
                        str(tmp / "runs"), "--threads", str(threads), "--quiet", "--overwrite"],
                       check=True)
    return time.perf_counter() - t0


def before_model(tmp: Path) -> str:
    """The default model directory as the previous default path used it."""
    from cellsam_rt.model_dir import DEFAULT_MODEL_DIR

    dst = tmp / "default-before"
    shutil.copytree(DEFAULT_MODEL_DIR, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.pop("object_diameter", None)
    manifest.pop("decoder_window", None)
    for files in manifest["graphs"].values():
        files.pop("decoder_window", None)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return str(dst)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 6000])
    p.add_argument("--before", action="store_true", help="also time the previous default path")
    p.add_argument("--before-max-size", type=int, default=2048, metavar="PX",
                   help="time the previous path only up to this size (it took 12 min at 6000 px)")
    p.add_argument("--fields", action="store_true",
                   help="also time the 16 copies of a 2096 mosaic as separate images")
    p.add_argument("--runs", action="store_true",
                   help="also time 16 `cellsam-rt run` processes, one per copy")
    p.add_argument("--compare", default=None, metavar="MODEL_DIR",
                   help="also time this model directory with default options")
    p.add_argument("--gap", type=int, default=0, help="zero pixels between copies (default 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = before_model(Path(tmp)) if args.before else None
        for size in args.sizes:
            cases = [("after", "default")] + ([("before", old)]
                                              if old and size <= args.before_max_size else [])
            if args.compare:
                cases.append(("compare", args.compare))
            if args.fields and size >= 2048:
                cases.append(("16 fields", "default"))
            for mode, model in cases:
                row = run_case(mode, size, model, args.threads, args.repeats, args.gap)
                rows.append(row)
                print(f"{size:>5}² {mode:<9} {row['seconds']:8.2f} s {row['mpx_per_s']:7.3f} Mpx/s "
                      f"F1 all {row['f1_all']:.3f} interior {row['f1_interior']:.3f} "
                      f"IoU {row['mean_iou']:.3f} cells {row['cells']:>5} "
                      f"peak {row['peak_rss_mib']:7.0f} MiB "
                      f"decoder {100 * (row['decoder_share'] or 0):4.1f}% "
                      f"{row['ms_per_cell_decoder'] or 0:5.2f} ms/cell", flush=True)
            if args.runs and size >= 2048:
                seconds = time_runs(Path(tmp), size, args.gap, args.threads)
                rows.append({"mode": "16 runs", "size": size, "seconds": seconds})
                print(f"{size:>5}² 16 runs   {seconds:8.2f} s (16 cellsam-rt run processes)",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
