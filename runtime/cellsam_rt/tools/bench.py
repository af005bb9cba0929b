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

import os
import platform
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cellsam_rt import __version__

SCHEMA = "cellsam-rt-bench/1"
#: canonical stage order of the report (extra stages a run produces are appended)
STAGES = ("read", "preprocess", "encoder", "cellfinder", "detect", "decoder", "paste",
          "postprocess", "outline", "write")
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
              "masks": ("decoder", "paste"),
              "postprocess": ("postprocess", "outline", "table")}
_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                      "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")


# -------------------------------------------------------------------- machine and memory

def cpu_info() -> dict:
    """CPU model, cores, memory and the SIMD flags that matter for ONNX Runtime's kernels."""
    import cpuinfo  # py-cpuinfo
    import psutil

    info = cpuinfo.get_cpu_info()
    flags = set(info.get("flags", ()))
    try:
        usable = len(psutil.Process().cpu_affinity())
    except (AttributeError, NotImplementedError):  # no affinity on this platform
        usable = psutil.cpu_count()
    return {"model": info.get("brand_raw") or platform.processor() or "unknown",
            "logical_cores": psutil.cpu_count(), "usable_cores": usable,
            "simd": [f for f in _FLAGS_OF_INTEREST if f in flags],
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}


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
    from cellsam_rt import kernels as ops

    usable, why = ops.status()  # which attention kernel path the CPU graphs get
    out["cellsam-rt kernels"] = why if usable else f"not used: {why}"
    return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (since the last reset_peak_rss()).

    Linux's VmHWM, which clear_refs resets; getrusage's ru_maxrss also keeps the peaks of
    threads that have exited, so it cannot be reset per run (psutil offers neither)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


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
    import psutil

    reset = reset_peak_rss()
    start = psutil.Process().memory_info().rss / 2**20
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
        from cellsam_rt.io import read_image

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
        from cellsam_rt.stages.detect import decode_detections
        from cellsam_rt.stages.preprocess import preprocess

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
        from cellsam_rt.io import write_labels_tiff, write_table_csv

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
    from cellsam_rt.io import write_labels_tiff, write_table_csv
    from cellsam_rt.pipeline.runner import PipelinedRunner, SegmentJob, SegmenterStages, run_sequential

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

REFERENCE_ENTRY_POINT = ("cellsam_rt.reference", "runner")


def ReferenceRunner(*args, **kwargs):
    """The PyTorch reference runner, registered by the PyTorch side under the entry point
    `cellsam_rt.reference:runner` and loaded only when asked for."""
    group, name = REFERENCE_ENTRY_POINT
    eps = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    try:
        if not eps:
            raise ImportError(f"no entry point {group}:{name}")
        runner = eps[0].load()
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

