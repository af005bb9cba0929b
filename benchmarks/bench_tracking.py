"""Tracking benchmark: linking speed at ~500 cells per frame against segmentation speed, linker
accuracy on noisy ground truth, and end-to-end scores from raw generated frames.

    python benchmarks/bench_tracking.py [--quick] [--json FILE]

1. Speed: a 20-frame 1024x1024 generated label movie (~500 nuclei per frame, 20 divisions; masks
   with boundary noise and one dropped detection) is linked (and scored) by each linker; laptrack's OverLapTrack on the first few frames only (it is slow at
   this density). One rendered 1024x1024 frame of the same movie is segmented by the default
   model in the same process, for the per-frame comparison.
2. Linker accuracy: generated 256x256 movies (12 nuclei, 3 divisions, one hidden cell), ground
   truth masks with one-pixel boundary noise and one dropped detection, at a slow and a fast
   drift; TRA, DET and division precision / recall from py-ctcmetrics.
3. End to end: generated raw movies segmented by the default model, linked by each linker, and
   scored the same way.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cellsam_rt.io.ctc import write_ctc
from cellsam_rt.workflows.timelapse_synth import drop_detection, jitter_masks, make_movie
from cellsam_rt.workflows.track_metrics import score_tracking
from cellsam_rt.workflows.tracking import METHODS, link


def _score(result, movie) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "gt").mkdir()
        (tmp / "res").mkdir()
        write_ctc(tmp / "gt", movie.labels, movie.tracks)
        write_ctc(tmp / "res", result.labels, result.tracks)
        return score_tracking(tmp / "res", tmp / "gt")


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def bench_speed(quick: bool) -> dict:
    n_frames = 6 if quick else 20
    movie = make_movie(n_frames=n_frames, shape=(1024, 1024), n_cells=500, divisions=20,
                       seed=0, render=False)
    cells = float(np.mean([len(np.unique(f)) - 1 for f in movie.labels]))
    det, _ = drop_detection(jitter_masks(movie.labels, seed=0), frame=n_frames // 2, seed=0)
    out = {"frames": n_frames, "shape": [1024, 1024], "cells_per_frame": cells}
    for method in METHODS:
        frames = min(n_frames, 4) if method == "laptrack-overlap" else n_frames
        t0 = time.perf_counter()
        res = link(det[:frames], method=method)
        dt = time.perf_counter() - t0
        out[f"link_s_per_frame[{method}]"] = dt / (frames - 1)
        out[f"link_frames[{method}]"] = frames
        line = (f"  link {method:18s} {dt / (frames - 1):7.3f} s/frame over {frames} frames "
                f"({res.n_tracks} tracks, {res.lineage()['divisions']} divisions)")
        if frames == n_frames:  # scored against the whole ground truth
            sc = _score(res, movie)
            out[f"scores[{method}]"] = {k: sc[k] for k in ("TRA", "DET", "division_precision",
                                                           "division_recall")}
            line += "  " + "  ".join(f"{k} {v:.4f}" for k, v in out[f"scores[{method}]"].items())
        print(line, flush=True)

    from cellsam_rt.pipeline import Segmenter

    image = make_movie(n_frames=1, shape=(1024, 1024), n_cells=500, divisions=0, missing=False,
                       seed=0).images[0]
    seg = Segmenter()
    seg.segment(image[:256, :256])  # warm-up (session creation, first-call allocations)
    t0 = time.perf_counter()
    result = seg.segment(image)
    dt = time.perf_counter() - t0
    out["segment_s_per_frame"] = dt
    out["segment_cells"] = int(result.n_cells)
    out["segment_tiled"] = bool(result.tiled)
    print(f"  segment (default model) {dt:7.2f} s/frame ({result.n_cells} cells found, "
          f"tiled={result.tiled})", flush=True)
    return out


def bench_linker_accuracy(quick: bool) -> dict:
    seeds = range(3 if quick else 10)
    out = {}
    for speed in (1.5, 4.0):
        rows = {m: [] for m in METHODS}
        for seed in seeds:
            movie = make_movie(n_frames=15, n_cells=12, divisions=3, speed=speed, seed=seed,
                               render=False)
            det, _ = drop_detection(jitter_masks(movie.labels, seed=seed), frame=7, seed=seed)
            for method in METHODS:
                rows[method].append(_score(link(det, method=method), movie))
        for method, r in rows.items():
            key = f"speed{speed}[{method}]"
            out[key] = {k: _mean(r, k) for k in ("TRA", "DET", "division_precision",
                                                 "division_recall")}
            print(f"  drift {speed} px/frame {method:18s} " + "  ".join(
                f"{k} {v:.4f}" for k, v in out[key].items()), flush=True)
    return out


def bench_end_to_end(quick: bool) -> dict:
    from cellsam_rt.pipeline import Segmenter

    seg = Segmenter()
    seeds = range(1 if quick else 3)
    rows = {m: [] for m in METHODS}
    seg_time, n = 0.0, 0
    for seed in seeds:
        movie = make_movie(n_frames=12, shape=(256, 256), n_cells=12, divisions=3, seed=seed)
        t0 = time.perf_counter()
        stack = np.stack([seg.segment(f).labels for f in movie.images])
        seg_time += time.perf_counter() - t0
        n += len(movie.images)
        for method in METHODS:
            rows[method].append(_score(link(stack, method=method), movie))
    out = {"movies": len(seeds), "frames_each": 12, "segment_s_per_frame_256": seg_time / n}
    for method, r in rows.items():
        out[method] = {k: _mean(r, k) for k in ("TRA", "DET", "division_precision",
                                                "division_recall")}
        print(f"  end-to-end {method:18s} " + "  ".join(
            f"{k} {v:.4f}" for k, v in out[method].items()), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and movies")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--skip", action="append", default=[],
                        choices=("speed", "accuracy", "e2e"), help="skip a part")
    args = parser.parse_args(argv)
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "python": sys.version.split()[0], "machine": platform.processor() or
              platform.machine(), "command": " ".join(["python", *sys.argv])}
    parts = (("speed", bench_speed), ("accuracy", bench_linker_accuracy),
             ("e2e", bench_end_to_end))
    for name, fn in parts:
        if name in args.skip:
            continue
        print(f"{name}:", flush=True)
        record[name] = fn(args.quick)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
