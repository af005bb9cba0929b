"""One benchmark configuration per process, so that its peak RSS is its own (JSON on stdout).

    python benchmarks/measure.py decoder --model DIR --embeddings E.npy --boxes 1000 --chunk 64
    python benchmarks/measure.py image --model DIR --size 2048 --pitch 40
    python benchmarks/measure.py trunk --model DIR --graph encoder --variant int8 --save out.npz

`decoder`: batched mask decoding (cellsam_rt.stages.masks.decode_masks) of N prompt boxes on one image
embedding (with --paste, also the ROI paste into a label image); `image`: Segmenter.segment on
a synthetic image of cells (user boxes at the cells, so the box count follows the image size),
tiled or not; `trunk`: one trunk graph (encoder or CellFinder) under one precision/option variant
on the synthetic 512x512 image, outputs saved for the parity comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def square_grid_boxes(n: int, size: int) -> np.ndarray:
    """n xyxy boxes on a regular grid over a size x size frame (fixed, spread-out decoder load)."""
    from cellsam_rt.tools.bench import grid_boxes

    return grid_boxes((size, size), n)


def measure_decoder(args) -> dict:
    """Time decode_masks + paste for N boxes at a chunk size; RSS before and at peak."""
    from cellsam_rt.backends import create_backend
    from cellsam_rt.stages.masks import decode_masks, paste_masks
    from cellsam_rt.model_dir import ModelDir

    model = ModelDir.load(args.model)
    S = model.image_size
    backend = create_backend(model, precision=args.precision, threads=args.threads)
    backend.load(["decoder"])
    emb = np.load(args.embeddings).astype(np.float32)
    boxes = square_grid_boxes(args.boxes, S)
    box_image = np.zeros(len(boxes), np.int64)
    rss_loaded = _status_mib("VmRSS")
    run = backend.run  # decode_masks calls run("decoder", inputs)
    # Warm-up on one chunk-sized call: arena growth and first-call costs stay out of the timing.
    for _ in decode_masks(run, emb, boxes[:min(args.chunk, len(boxes))],
                          box_image[:min(args.chunk, len(boxes))], args.chunk, 0.0):
        pass
    labels = np.zeros((args.image_size, args.image_size), np.int32)
    t_dec = t_paste = 0.0
    kept_total, next_label = 0, 1
    t0 = time.perf_counter()
    chunks = decode_masks(run, emb, boxes, box_image, args.chunk, 0.0)
    while True:
        a = time.perf_counter()
        item = next(chunks, None)
        b = time.perf_counter()
        t_dec += b - a
        if item is None:
            break
        kept, logits, _iou = item
        if args.paste:
            ids = np.arange(next_label, next_label + len(kept), dtype=np.int32)
            next_label += len(kept)
            paste_masks(labels, logits, ids, S)
            t_paste += time.perf_counter() - b
        kept_total += len(kept)
    wall = time.perf_counter() - t0
    return {"kind": "decoder", "boxes": args.boxes, "chunk": args.chunk,
            "precision": args.precision, "threads": args.threads,
            "decoder_s": t_dec, "paste_s": t_paste if args.paste else None, "wall_s": wall,
            "decoder_ms_per_box": 1000 * t_dec / args.boxes,
            "boxes_per_s": args.boxes / t_dec, "masks": kept_total,
            "rss_after_load_mib": rss_loaded, "peak_rss_mib": _status_mib("VmHWM")}


def measure_image(args) -> dict:
    """Time Segmenter.segment on a synthetic size x size image with one box per cell."""
    from cellsam_rt.stages import tiling
    from cellsam_rt.tools.bench import synthetic_cells
    from cellsam_rt.pipeline.segmenter import Segmenter

    n_cells = max(1, int(round((args.size / args.pitch) ** 2)))
    image, boxes = synthetic_cells(args.size, n_cells, seed=1)
    seg = Segmenter(args.model, precision=args.precision, threads=args.threads, tile=args.tile,
                    chunk_size=args.chunk)
    seg.backend.load()
    rss_loaded = _status_mib("VmRSS")
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = seg.segment(image, boxes=boxes)
        runs.append({"wall_s": time.perf_counter() - t0, **result.timings})
    n_tiles = len(tiling.tile_grid(image.shape)) if result.tiled else 1
    return {"kind": "image", "size": args.size, "cells": n_cells, "labels": result.n_cells,
            "tiled": result.tiled, "tiles": n_tiles, "precision": args.precision,
            "runs": runs, "wall_s": float(np.median([r["wall_s"] for r in runs])),
            "image_mib": image.nbytes / 2**20,
            "rss_after_load_mib": rss_loaded, "peak_rss_mib": _status_mib("VmHWM")}


#: trunk variants: name -> (precision, backend options); see test_bench_trunks.py. "fp32" is
#: the plain exported graph (the baseline every other variant is compared with).
PLAIN = {"fused_attention": False}
TRUNK_VARIANTS = {
    "fp32": ("fp32", PLAIN),
    "fp32-fusedattn": ("fp32", {}),  # the model directory's cpu graphs (the CPU default)
    "fp32-basic": ("fp32", {**PLAIN, "graph_optimization_level": "basic"}),
    "fp32-vitfused": ("fp32", {"vit_fusions": True}),
    "fp32-1thread": ("fp32", {**PLAIN, "threads": 1}),
    "fp16": ("fp16", {}),
    "int8": ("int8", {}),  # quantised from the fused-attention graphs (`cellsam-rt quantize`)
    "int8-plain": ("int8", {"fused": False}),
    "int8pc": ("int8", {"per_channel": True}),
    "int8attn": ("int8", {"weights_only": False, "fused": False}),
}


def trunk_backend(model_dir: Path, variant: str, threads, arena: str = "shared"):
    """The ONNX Runtime backend of one trunk variant."""
    import bench_cache

    precision, opts = TRUNK_VARIANTS[variant]
    opts = dict(opts)
    n = opts.pop("threads", threads)
    if opts.pop("vit_fusions", False):
        files = {"encoder": bench_cache.fused_graph(model_dir, "encoder")}
        return bench_cache.variant_backend(model_dir, "fp32", files, threads=n, arena=arena,
                                           fused_attention=False)
    if precision == "int8":
        return bench_cache.int8_backend(model_dir, per_channel=opts.pop("per_channel", False),
                                        weights_only=opts.pop("weights_only", True),
                                        fused=opts.pop("fused", True), threads=n, arena=arena)
    return bench_cache.cpu_backend(model_dir, n, precision=precision, arena=arena, **opts)


def measure_trunk(args) -> dict:
    """Time one trunk graph under one variant; save its outputs for the parity check."""
    from cellsam_rt.tools.bench import synthetic_cells
    from cellsam_rt.model_dir import ModelDir
    from cellsam_rt.stages.preprocess import preprocess

    model = ModelDir.load(args.model)
    image, _boxes = synthetic_cells(512, 32, seed=0)  # the benchmarks' shared image
    enc, fin, _ = preprocess(image, model.image_size, model.has_model_cp)
    feed = {"image": (enc if args.graph == "encoder" else fin)[None]}
    backend = trunk_backend(args.model, args.variant, args.threads)
    t0 = time.perf_counter()
    backend.load([args.graph])
    load_s = time.perf_counter() - t0
    rss_loaded = _status_mib("VmRSS")
    times = []
    for _ in range(args.warmup + args.rounds):
        t0 = time.perf_counter()
        out = backend.run(args.graph, feed)
        times.append(time.perf_counter() - t0)
    if args.save:
        np.savez(args.save, **out)
    timed = times[args.warmup:]
    return {"kind": "trunk", "graph": args.graph, "variant": args.variant,
            "describe": backend.describe(), "session_load_s": load_s,
            "warmup_s": times[:args.warmup], "samples_s": timed,
            "median_s": float(np.median(timed)),
            "rss_after_load_mib": rss_loaded, "peak_rss_mib": _status_mib("VmHWM")}


def main(argv=None) -> int:
    """Parse, run one configuration, print its JSON record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kind", required=True)
    d = sub.add_parser("decoder")
    d.add_argument("--embeddings", type=Path, required=True)
    d.add_argument("--boxes", type=int, required=True)
    d.add_argument("--chunk", type=int, default=64)
    d.add_argument("--image-size", type=int, default=512)
    d.add_argument("--paste", action="store_true",
                   help="also paste the masks (random weights give frame-sized masks, so this "
                        "measures the worst case of the paste, not a typical one)")
    i = sub.add_parser("image")
    i.add_argument("--size", type=int, required=True)
    i.add_argument("--pitch", type=float, default=40.0, help="cell spacing in pixels")
    i.add_argument("--tile", default="always")
    i.add_argument("--chunk", type=int, default=64)
    i.add_argument("--repeats", type=int, default=1)
    t = sub.add_parser("trunk")
    t.add_argument("--graph", choices=("encoder", "cellfinder"), required=True)
    t.add_argument("--variant", choices=tuple(TRUNK_VARIANTS), default="fp32")
    t.add_argument("--rounds", type=int, default=1)
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--save", type=Path, default=None, help="write the outputs (.npz)")
    for q in (d, i, t):
        q.add_argument("--model", type=Path, required=True)
        q.add_argument("--threads", type=int, default=None)
    for q in (d, i):
        q.add_argument("--precision", default="fp32")
    args = p.parse_args(argv)
    out = {"decoder": measure_decoder, "image": measure_image,
           "trunk": measure_trunk}[args.kind](args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
