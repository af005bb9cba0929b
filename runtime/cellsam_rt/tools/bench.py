"""`cellsam-rt bench`: per-stage latency, throughput and memory, optionally against the reference.

Every repeat runs the whole user-visible path: read the image file, segment it, write the label
TIFF and the cell table. Stages come from `Segmenter`'s own timings; read, write and (with user
boxes) CellFinder + set decoding are timed here around the public functions, so a run with a
fixed box count still pays for every stage of the detection workflow.

`--reference CHECKPOINT` runs the PyTorch reference (cellsam_export, needs the [export] extra) in
the same process on the same image and boxes, interleaved with our repeats so that background
load drifts affect both sides alike, and reports ours/reference per stage.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from . import __version__

SCHEMA = "cellsam-rt-bench/1"
#: canonical stage order of the report (extra stages a run produces are appended)
STAGES = ("read", "preprocess", "encoder", "cellfinder", "detect", "decoder", "paste",
          "postprocess", "write")
#: reference stage names grouped onto ours, for the ratio table (read/write: ours only)
REFERENCE_GROUPS = {
    "preprocess": ("normalize", "resize", "sam_input", "cellfinder_input"),
    "encoder": ("encoder",),
    "cellfinder": ("cellfinder",),
    "detect": ("detect",),
    "masks": ("masks",),  # decoder calls + full-frame upsampling, interleaved per box
    "postprocess": ("merge", "postprocess"),
}
OUR_GROUPS = {"preprocess": ("preprocess",), "encoder": ("encoder",),
              "cellfinder": ("cellfinder",), "detect": ("detect",),
              "masks": ("decoder", "paste"), "postprocess": ("postprocess", "table")}
_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                      "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")


# -------------------------------------------------------------------- machine and memory

def cpu_info() -> dict:
    """CPU model, cores and the SIMD flags that matter for ONNX Runtime's kernels."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    info = {"model": model, "logical_cores": os.cpu_count(), "usable_cores": usable,
            "simd": [f for f in _FLAGS_OF_INTEREST if f in flags]}
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            total_kib = int(next(l for l in fh if l.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(total_kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return info


def load_average() -> Optional[list[float]]:
    """1/5/15-minute load average (background load makes timings noisy), None if unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def package_versions(with_torch: bool = False) -> dict:
    """Versions of the packages that decide the speed (torch only when the reference ran)."""
    names = {"cellsam-rt": ("cellsam-rt",), "numpy": ("numpy",),
             "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
             "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python")}
    if with_torch:
        names["torch"] = ("torch",)
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for key, dists in names.items():
        out[key] = None
        for dist in dists:
            try:
                out[key] = f"{dist} {metadata.version(dist)}"
                break
            except metadata.PackageNotFoundError:
                continue
    if out["cellsam-rt"] is None:
        out["cellsam-rt"] = f"cellsam-rt {__version__}"
    from . import ops

    usable, why = ops.status()  # which attention kernel path the CPU graphs get
    out["cellsam-rt kernels"] = why if usable else f"not used: {why}"
    return out


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    hwm = _status_kib("VmHWM")
    if hwm is None:
        import resource
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return hwm / 1024.0


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter (Linux >= 4.0) so a peak can be measured per run."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@contextmanager
def rss_window(out: dict):
    """Record the peak RSS during the block and how far it rose above the RSS at its start."""
    reset = reset_peak_rss()
    start = (_status_kib("VmRSS") or 0) / 1024.0
    try:
        yield
    finally:
        peak = peak_rss_mib()
        out["peak_rss_mib"] = peak
        out["working_set_mib"] = max(0.0, peak - start) if reset else None


# -------------------------------------------------------------------- inputs

def synthetic_cells(size: int = 512, n_cells: int = 32, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A uint16 image of n blurred elliptical cells on a jittered grid, and their xyxy boxes."""
    import cv2

    rng = np.random.default_rng(seed)
    h = w = int(size)
    side = int(np.ceil(np.sqrt(n_cells)))
    pitch = min(h, w) / side
    canvas = np.zeros((h, w), np.float32)
    boxes = []
    for i in range(n_cells):
        gy, gx = divmod(i, side)
        cy = (gy + 0.5 + rng.uniform(-0.15, 0.15)) * pitch
        cx = (gx + 0.5 + rng.uniform(-0.15, 0.15)) * pitch
        ry, rx = rng.uniform(0.2, 0.33, 2) * pitch
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(canvas, (int(round(cx)), int(round(cy))), (int(round(rx)), int(round(ry))),
                    angle, 0, 360, float(rng.uniform(0.5, 1.0)), -1)
        r = max(rx, ry) + 2
        boxes.append([max(cx - r, 0), max(cy - r, 0), min(cx + r, w - 1), min(cy + r, h - 1)])
    canvas = cv2.GaussianBlur(canvas, (0, 0), 1.5)
    canvas += rng.normal(0.0, 0.03, canvas.shape).astype(np.float32)
    image = np.clip(canvas * 20000 + 1000, 0, 65535).astype(np.uint16)
    return image, np.asarray(boxes, np.float32).reshape(-1, 4)


def grid_boxes(shape: tuple[int, int], n: int) -> np.ndarray:
    """n xyxy boxes on a regular grid over an image (a fixed box count for any image)."""
    h, w = shape[:2]
    side = int(np.ceil(np.sqrt(n)))
    py, px = h / side, w / side
    boxes = [[(i % side + 0.15) * px, (i // side + 0.15) * py,
              (i % side + 0.85) * px, (i // side + 0.85) * py] for i in range(n)]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


# -------------------------------------------------------------------- statistics

def summarize(samples: list[float]) -> dict:
    """median, p95, mean, min, max of a list of seconds (p95 interpolated; ~max for few repeats)."""
    a = np.asarray(samples, dtype=np.float64)
    return {"median_s": float(np.median(a)), "p95_s": float(np.percentile(a, 95)),
            "mean_s": float(a.mean()), "min_s": float(a.min()), "max_s": float(a.max()),
            "n": int(a.size), "samples_s": [round(float(v), 6) for v in a]}


def _stage_table(runs: list[dict], order: tuple[str, ...]) -> dict:
    """Per-stage summaries over runs; stages missing from a run count as 0 there."""
    names = list(order) + sorted({k for r in runs for k in r} - set(order) - {"total"})
    out = {name: summarize([r.get(name, 0.0) for r in runs]) for name in names
           if any(name in r for r in runs)}
    out["total"] = summarize([r["total"] for r in runs])
    return out


# -------------------------------------------------------------------- our pipeline

class OurRunner:
    """One timed repeat of read -> segment -> write with a Segmenter."""

    def __init__(self, segmenter, image_path: Path, boxes: Optional[np.ndarray],
                 time_cellfinder: bool, channels=None, out_dir: Optional[Path] = None):
        from .io import read_image

        self.segmenter = segmenter
        self.image_path = image_path
        self.boxes = boxes
        self.time_cellfinder = time_cellfinder and boxes is not None
        self.channels = channels
        self.read_image = read_image
        self.out_dir = out_dir
        self.last_result = None

    def _cellfinder(self, image: np.ndarray, times: dict) -> None:
        """With user boxes Segmenter skips detection: run it here so the total includes it."""
        from .detect import decode_detections
        from .preprocess import preprocess

        seg = self.segmenter
        _enc, finder_in, _norm = preprocess(image, seg.size, seg.has_model_cp, self.channels)
        t0 = time.perf_counter()
        out = seg.backend.run("cellfinder", {"image": finder_in[None]})
        t1 = time.perf_counter()
        decode_detections(out["class_logits"][0], out["boxes"][0], seg.size, seg.bbox_threshold)
        t2 = time.perf_counter()
        times["cellfinder"] = times.get("cellfinder", 0.0) + t1 - t0
        times["detect"] = times.get("detect", 0.0) + t2 - t1

    def __call__(self) -> dict:
        from .io import write_labels_tiff, write_table_csv

        times: dict[str, float] = {}
        t0 = time.perf_counter()
        image = self.read_image(self.image_path)
        times["read"] = time.perf_counter() - t0
        result = self.segmenter.segment(image, channels=self.channels, boxes=self.boxes)
        seg_times = dict(result.timings)
        seg_total = seg_times.pop("total")
        times.update(seg_times)
        if self.time_cellfinder:
            self._cellfinder(image, times)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=self.out_dir) as tmp:
            write_labels_tiff(Path(tmp) / "labels.tif", result.labels)
            write_table_csv(Path(tmp) / "cells.csv", result.table)
        times["write"] = time.perf_counter() - t0
        # segment() also spends time outside its named stages (tile decision, bookkeeping).
        times["total"] = (times["read"] + seg_total + times["write"]
                          + (times["cellfinder"] + times["detect"] if self.time_cellfinder else 0))
        # The table is part of postprocessing in the report.
        if "table" in times:
            times["postprocess"] = times.get("postprocess", 0.0) + times.pop("table")
        self.last_result = result
        return times


def measure_throughput(segmenter, image_path: Path, boxes: Optional[np.ndarray], n: int,
                       out_dir: Path, workers: int = 1) -> dict:
    """images/s over n copies of the image (read -> segment -> write), one after another and
    through the pipelined runner (reading + preprocessing of the next images on worker threads)."""
    from .io import write_labels_tiff, write_table_csv
    from .runner import PipelinedRunner, SegmentJob, SegmenterStages, run_sequential

    stages = SegmenterStages(segmenter)

    def write(result) -> None:
        write_labels_tiff(out_dir / "throughput_labels.tif", result.labels)
        write_table_csv(out_dir / "throughput_cells.csv", result.table)

    jobs = [SegmentJob(image_path, boxes=boxes) for _ in range(n)]
    runs = {"sequential": lambda: run_sequential(stages.prepare, stages.infer, write, jobs),
            "pipelined": lambda: PipelinedRunner(stages.prepare, stages.infer, write,
                                                 workers=workers).run(jobs)}
    out: dict[str, Any] = {"throughput_images": n, "workers": workers}
    for name, start in runs.items():
        t0 = time.perf_counter()
        for res in start():
            if not res.ok:
                raise RuntimeError(f"throughput run ({name}) failed in {res.stage}: {res.error}")
        out[f"{name}_images_per_s"] = n / (time.perf_counter() - t0)
    return out


# -------------------------------------------------------------------- the reference

def ReferenceRunner(*args, **kwargs):
    """The PyTorch reference runner (cellsam_export.bench_reference), imported only when asked for."""
    try:
        from cellsam_export.bench_reference import ReferenceRunner as runner
    except ImportError as exc:
        raise RuntimeError("--reference needs the PyTorch side: pip install "
                           f"'cellsam-rt[export]' ({exc})") from exc
    return runner(*args, **kwargs)


def grouped(stage_runs: list[dict], groups: dict) -> dict:
    """Median seconds per comparison group (plus "segment": everything but read/write)."""
    out = {}
    for name, members in groups.items():
        vals = [sum(r.get(m, 0.0) for m in members) for r in stage_runs]
        if any(any(m in r for m in members) for r in stage_runs):
            out[name] = float(np.median(vals))
    out["segment"] = float(np.median([r["total"] - r.get("read", 0.0) - r.get("write", 0.0)
                                      for r in stage_runs]))
    return out


def label_agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Foreground IoU and exact-match fraction between two label images."""
    a, b = np.asarray(ours) > 0, np.asarray(theirs) > 0
    union = np.logical_or(a, b).sum()
    return {"foreground_iou": float(np.logical_and(a, b).sum() / union) if union else 1.0,
            "labels_equal": bool(np.array_equal(np.asarray(ours, np.int64),
                                                np.asarray(theirs, np.int64)))}


# -------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt bench`."""
    parser.add_argument("--model", default="default", metavar="DIR",
                        help="model directory or 'default' (default)")
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
    parser.add_argument("--backend", default="cpu",
                        help="inference backend: cpu, cuda, tensorrt-ep, tensorrt (default cpu)")
    parser.add_argument("--precision", default="fp32",
                        help="graph precision: fp32, fp16 or int8 when the model has it "
                             "(default fp32)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads (default: onnxruntime's choice, all cores)")
    parser.add_argument("--inter-op-threads", type=int, default=None, metavar="N",
                        help="onnxruntime inter-op threads (default: onnxruntime's choice)")
    parser.add_argument("--graph-opt", default=None,
                        choices=("disable", "basic", "extended", "all"),
                        help="onnxruntime graph optimisation level (default: the backend's)")
    parser.add_argument("--tile", choices=("auto", "never", "always"), default="never",
                        help="tiling (default never: the reference's whole-image path, so the "
                             "comparison is like for like)")
    parser.add_argument("--chunk-size", type=int, default=None, metavar="N",
                        help="boxes per decoder call (default: the Segmenter's)")
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
    from .detect import load_boxes
    from .io import read_image

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
    from .backends import create_backend
    from .model_dir import resolve_model
    from .pipeline import Segmenter

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
    seg_kw: dict[str, Any] = {"tile": args.tile}
    if args.chunk_size is not None:
        seg_kw["chunk_size"] = args.chunk_size
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
