"""`cellsam-rt bench`: time the pipeline stage by stage (and the PyTorch reference beside it)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from cellsam_rt.cli.options import add_model_options, add_segmenter_options, segmenter_kwargs
from cellsam_rt.tools.bench import (OUR_GROUPS, REFERENCE_GROUPS, SCHEMA, STAGES, OurRunner,
                                    ReferenceRunner, _stage_table, cpu_info, grid_boxes, grouped,
                                    label_agreement, load_average, measure_throughput,
                                    package_versions, rss_window, synthetic_cells)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt bench`."""
    add_model_options(parser)
    add_segmenter_options(parser, channels_option=False)
    parser.add_argument("--image", type=Path, default=None, metavar="FILE",
                        help="image to segment (default: a synthetic SIZE x SIZE image of "
                             "N-BOXES cells whose boxes are used as prompts)")
    parser.add_argument("--size", type=int, default=512, metavar="PX",
                        help="side of the synthetic image (default 512)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--boxes", type=Path, default=None, metavar="FILE",
                       help="prompt boxes (CSV or JSON, xyxy image pixels) instead of detection")
    group.add_argument("--n-boxes", type=int, default=None, metavar="N",
                       help="use N prompt boxes (the synthetic cells' boxes, or a regular grid "
                            "over --image) so the decoder load is fixed (default 32 for the "
                            "synthetic image; CellFinder's detections with --image)")
    parser.add_argument("--detect", action="store_true",
                        help="prompt with CellFinder's detections even on the synthetic image "
                             "(with random weights the box count is arbitrary)")
    parser.add_argument("--skip-cellfinder", action="store_true",
                        help="with prompt boxes, do not time CellFinder + set decoding (the "
                             "labelling workflow); by default they are timed so totals cover "
                             "the whole detection pipeline")
    parser.add_argument("--inter-op-threads", type=int, default=None, metavar="N",
                        help="onnxruntime inter-op threads (default: onnxruntime's choice)")
    parser.add_argument("--graph-opt", default=None,
                        choices=("disable", "basic", "extended", "all"),
                        help="onnxruntime graph optimisation level (default: the backend's)")
    parser.add_argument("--repeats", type=int, default=5, metavar="N",
                        help="timed repeats (default 5)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N",
                        help="untimed runs first (default 1)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the full record as JSON")
    parser.add_argument("--reference", type=Path, default=None, metavar="CHECKPOINT",
                        help="also run the PyTorch reference on this checkpoint (the one the "
                             "model was exported from; needs the [export] extra) and print "
                             "ours/reference ratios")
    parser.add_argument("--reference-repeats", type=int, default=1, metavar="N",
                        help="timed reference repeats (default 1: it is slow)")
    parser.add_argument("--reference-warmup", type=int, default=0, metavar="N",
                        help="untimed reference runs first (default 0)")
    parser.add_argument("--throughput", action="store_true",
                        help="also time THROUGHPUT_IMAGES copies of the image one after another "
                             "and pipelined (next images read and preprocessed on a worker "
                             "thread during inference), in images/s")
    parser.add_argument("--throughput-images", type=int, default=8, metavar="N",
                        help="images per throughput run (default 8)")
    parser.add_argument("--quiet", action="store_true", help="print only the tables")


def _prepare_input(args, workdir: Path) -> tuple[Path, np.ndarray, Optional[np.ndarray], dict]:
    """The image file to read each repeat, the image, the prompt boxes and a description."""
    from cellsam_rt.stages.detect import load_boxes
    from cellsam_rt.io import read_image

    if args.image is None:
        n = 32 if args.n_boxes is None else args.n_boxes
        image, boxes = synthetic_cells(args.size, max(n, 1))
        boxes = boxes[:n]
        path = workdir / "synthetic.tif"
        import tifffile
        tifffile.imwrite(path, image)
        desc = {"source": f"synthetic ({n} cells)", "shape": list(image.shape),
                "dtype": str(image.dtype)}
        source = "synthetic cells"
    else:
        path = args.image
        image = read_image(path)
        desc = {"source": str(path), "shape": list(image.shape), "dtype": str(image.dtype)}
        boxes, source = None, "detections"
        if args.n_boxes is not None:
            boxes, source = grid_boxes(image.shape, args.n_boxes), "grid"
    if args.boxes is not None:
        boxes, source = load_boxes(args.boxes), str(args.boxes)
    if args.detect:
        boxes, source = None, "detections"
    box_desc = {"source": source, "count": None if boxes is None else int(len(boxes))}
    return path, image, boxes, {"image": desc, "boxes": box_desc}


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _timed_loop(runners: list[tuple[str, Callable[[], dict], int, int]], say) -> dict:
    """Warm up each runner, then interleave their timed repeats; per-run times and peaks."""
    record: dict[str, dict] = {name: {"runs": [], "memory": []} for name, *_ in runners}
    for name, fn, warmup, _repeats in runners:
        for i in range(warmup):
            t0 = time.perf_counter()
            mem: dict = {}
            with rss_window(mem):
                fn()
            say(f"{name}: warm-up {i + 1}/{warmup} {time.perf_counter() - t0:.2f} s")
            record[name]["warmup_memory"] = mem
    for i in range(max(r for *_, r in runners)):
        for name, fn, _warmup, repeats in runners:
            if i >= repeats:
                continue
            mem = {}
            with rss_window(mem):
                times = fn()
            record[name]["runs"].append(times)
            record[name]["memory"].append(mem)
            say(f"{name}: repeat {i + 1}/{repeats} {times['total']:.2f} s")
    return record


def _memory_summary(mems: list[dict]) -> dict:
    peaks = [m["peak_rss_mib"] for m in mems if m.get("peak_rss_mib") is not None]
    work = [m["working_set_mib"] for m in mems if m.get("working_set_mib") is not None]
    return {"peak_rss_mib": round(max(peaks), 1) if peaks else None,
            "working_set_mib": round(max(work), 1) if work else None}


def format_report(rec: dict) -> str:
    """The human-readable tables of a bench record."""
    cfg, lines = rec["config"], []
    m = rec["machine"]
    lines.append(f"machine   {m['model']}, {m['usable_cores']} usable of {m['logical_cores']} "
                 f"logical cores, load average {rec.get('load_average_start')} -> "
                 f"{rec.get('load_average_end')}")
    lines.append(f"backend   {cfg['backend_description']}")
    lines.append(f"model     {cfg['model_name']} ({cfg['model']}), image {cfg['image']['shape']}"
                 f", prompts {cfg['boxes']['source']} ({cfg['boxes']['count']} boxes), "
                 f"tile {cfg['tile']}, chunk {cfg['chunk_size']}")
    lines.append(f"repeats   {cfg['repeats']} after {cfg['warmup']} warm-up")
    lines.append("")
    lines.append(f"{'stage':<12} {'median s':>10} {'p95 s':>10} {'share':>7}")
    total = rec["stages"]["total"]["median_s"]
    for name, s in rec["stages"].items():
        share = "" if name == "total" else f"{100 * s['median_s'] / total:6.1f}%"
        lines.append(f"{name:<12} {s['median_s']:>10.4f} {s['p95_s']:>10.4f} {share:>7}")
    t = rec["throughput"]
    lines.append("")
    lines.append(f"images/s  {t['images_per_s']:.4f}   cells {t['cells']}"
                 + (f"   decoder boxes/s {t['decoder_boxes_per_s']:.1f}"
                    if t.get("decoder_boxes_per_s") else ""))
    if "pipelined_images_per_s" in t:
        seq, pipe = t["sequential_images_per_s"], t["pipelined_images_per_s"]
        lines.append(f"{t['throughput_images']} images  sequential {seq:.4f} images/s   "
                     f"pipelined {pipe:.4f} images/s ({t['workers']} worker(s), "
                     f"{pipe / seq:.2f}x)")
    mem = rec["memory"]
    lines.append(f"peak RSS  {mem['peak_rss_mib']} MiB (process)"
                 + (f", +{mem['working_set_mib']} MiB during a repeat"
                    if mem.get("working_set_mib") is not None else ""))
    ref = rec.get("reference")
    if ref:
        lines.append("")
        lines.append(f"reference (PyTorch {ref['torch_threads']} threads, "
                     f"{ref['repeats']} repeat(s)); ratio = ours / reference (lower is faster)")
        lines.append(f"{'stage':<12} {'ours s':>10} {'ref s':>10} {'ratio':>8} {'speed-up':>9}")
        for name, row in ref["comparison"].items():
            lines.append(f"{name:<12} {row['ours_s']:>10.4f} {row['reference_s']:>10.4f} "
                         f"{row['ratio']:>8.3f} {row['speedup']:>8.2f}x")
        agree = ref.get("agreement")
        if agree:
            lines.append(f"labels    foreground IoU {agree['foreground_iou']:.4f}, identical "
                         f"{agree['labels_equal']}")
        lines.append(f"ref peak  {ref['memory']['peak_rss_mib']} MiB (process), "
                     f"+{ref['memory']['working_set_mib']} MiB during a repeat")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Benchmark the pipeline (and optionally the reference) and print/write the results."""
    from cellsam_rt.backends import create_backend
    from cellsam_rt.model_dir import resolve_model
    from cellsam_rt.pipeline.segmenter import Segmenter

    if (args.repeats < 1 or args.warmup < 0 or args.reference_repeats < 1
            or args.throughput_images < 1):
        print("error: --repeats, --reference-repeats and --throughput-images must be >= 1, "
              "--warmup >= 0", file=sys.stderr)
        return 2
    say = (lambda _t: None) if args.quiet else (lambda t: _say(args, t))
    model = resolve_model(args.model)
    backend_kw: dict[str, Any] = {}
    if args.inter_op_threads is not None:
        backend_kw["inter_op_threads"] = args.inter_op_threads
    if args.graph_opt is not None:
        backend_kw["graph_optimization_level"] = args.graph_opt
    backend = create_backend(model, backend=args.backend, precision=args.precision,
                             threads=args.threads, **backend_kw)
    # The segmentation options and their defaults are run's (cli/options.py), so the benchmark
    # measures what `cellsam-rt run` does.
    seg_kw = {k: v for k, v in segmenter_kwargs(args).items()
              if k not in ("model", "backend", "precision", "threads")}
    segmenter = Segmenter(model, backend=backend, **seg_kw)
    load_s = None
    if hasattr(backend, "load"):  # keep session creation out of the timed runs
        t0 = time.perf_counter()
        backend.load()
        load_s = time.perf_counter() - t0
        say(f"sessions loaded in {load_s:.2f} s")

    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="cellsam-bench-") as tmp:
        workdir = Path(tmp)
        image_path, image, boxes, input_desc = _prepare_input(args, workdir)
        time_cf = not args.skip_cellfinder
        ours = OurRunner(segmenter, image_path, boxes, time_cf, out_dir=workdir)
        runners = [("ours", ours, args.warmup, args.repeats)]
        reference = None
        if args.reference is not None:
            say(f"loading the reference from {args.reference} ...")
            try:
                reference = ReferenceRunner(args.reference, image, boxes, time_cf, args.threads,
                                            segmenter.bbox_threshold)
            except Exception as exc:  # noqa: BLE001 - missing extra, unreadable checkpoint
                print(f"error: reference: {exc}", file=sys.stderr)
                return 2
            runners.append(("reference", reference, args.reference_warmup,
                            args.reference_repeats))
        timed = _timed_loop(runners, say)
        throughput = None
        if args.throughput:
            throughput = measure_throughput(segmenter, image_path, boxes,
                                            args.throughput_images, workdir)
            say(f"throughput: {throughput['sequential_images_per_s']:.3f} images/s sequential, "
                f"{throughput['pipelined_images_per_s']:.3f} pipelined")

    runs = timed["ours"]["runs"]
    stages = _stage_table(runs, STAGES)
    result = ours.last_result
    n_boxes = len(boxes) if boxes is not None else (
        len(result.label_ids) if result is not None else 0)
    dec = stages.get("decoder", {}).get("median_s")
    rec: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": cpu_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "software": package_versions(with_torch=reference is not None),
        "config": {"model": str(model.path), "model_name": model.name,
                   "backend": args.backend, "backend_description": backend.describe(),
                   "precision": args.precision, "threads": args.threads,
                   # onnxruntime's default (0) is one thread per usable core
                   "threads_effective": args.threads or cpu_info()["usable_cores"],
                   "inter_op_threads": args.inter_op_threads, "graph_opt": args.graph_opt,
                   "tile": args.tile, "chunk_size": segmenter.chunk_size,
                   "repeats": args.repeats, "warmup": args.warmup,
                   "cellfinder_timed": bool(boxes is None or time_cf), **input_desc},
        "session_load_s": load_s,
        "stages": stages,
        "throughput": {"images_per_s": 1.0 / stages["total"]["median_s"],
                       "decoder_boxes_per_s": (n_boxes / dec if dec and boxes is not None
                                               else None),
                       "cells": None if result is None else result.n_cells,
                       **(throughput or {})},
        "memory": _memory_summary(timed["ours"]["memory"]),
    }
    if reference is not None:
        ref_runs = timed["reference"]["runs"]
        ours_g, ref_g = grouped(runs, OUR_GROUPS), grouped(ref_runs, REFERENCE_GROUPS)
        comparison = {}
        for name in ref_g:
            if name in ours_g and ref_g[name] > 0:
                comparison[name] = {"ours_s": ours_g[name], "reference_s": ref_g[name],
                                    "ratio": ours_g[name] / ref_g[name],
                                    "speedup": ref_g[name] / ours_g[name]
                                    if ours_g[name] > 0 else float("inf")}
        rec["reference"] = {
            "checkpoint": str(args.reference), "torch_threads": reference.torch.get_num_threads(),
            "repeats": args.reference_repeats, "warmup": args.reference_warmup,
            "stages": _stage_table(ref_runs, ()),
            "memory": _memory_summary(timed["reference"]["memory"]),
            "comparison": comparison,
            "agreement": (label_agreement(result.labels, reference.last_result.labels)
                          if result is not None and reference.last_result is not None
                          and not result.tiled else None),
        }
    print(format_report(rec))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    return 0
