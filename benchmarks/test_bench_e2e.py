"""End to end on the 512x512 image with 32 prompt boxes: ours (FP32, INT8 trunks) vs the reference.

Random weights make CellFinder's detections arbitrary, so the decoder is prompted with the
synthetic cells' 32 boxes (the labelling workflow) on both sides; CellFinder and set decoding
still run and are timed on both sides (cellsam_rt.tools.bench), so the totals cover every stage of
the detection workflow. All three run in this one process on the same weights and image; the
summary prints reference/ours per stage.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest

import bench_cache
from conftest import record

# side -> (rounds, warm-up rounds), in run order. The reference runs first, in a clean process:
# our backends share one memory arena that stays for the process (the plain graphs grow it to
# ~8 GB), and a reference run next to it measured up to 40 % slower.
# ours-fp32: fused-attention CPU graphs (the CPU default); ours-fp32-plain: the portable graphs
SIDES = {"reference": (2, 1), "ours-fp32": (3, 1), "ours-int8": (3, 1), "ours-fp32-plain": (2, 1)}
LABELS: dict = {}


def matched_iou(ours: np.ndarray, ref: np.ndarray) -> float:
    """Mean over reference cells of the best IoU with any of our cells (0 for a missed cell)."""
    a = np.asarray(ours, np.int64).ravel()
    b = np.asarray(ref, np.int64).ravel()
    ids_b = np.unique(b[b > 0])
    if ids_b.size == 0:
        return 1.0 if not (a > 0).any() else 0.0
    both = (a > 0) & (b > 0)
    base = int(a.max()) + 1
    pairs, inter = np.unique(b[both] * base + a[both], return_counts=True)
    area_a = np.bincount(a, minlength=base)
    area_b = np.bincount(b)
    pb, pa = pairs // base, pairs % base
    iou = inter / (area_a[pa] + area_b[pb] - inter)
    best = np.zeros(int(b.max()) + 1)
    np.maximum.at(best, pb, iou)
    return float(best[ids_b].mean())


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Foreground IoU, mean matched-cell IoU and exact equality of two label images."""
    from cellsam_rt.tools.bench import label_agreement

    out = label_agreement(ours, ref)
    out["mean_cell_iou"] = matched_iou(ours, ref)
    out["cells"] = [int(len(np.unique(ours)) - 1), int(len(np.unique(ref)) - 1)]
    return out


def _runner(side, model_dir, checkpoint, image_512, threads, tmp_path):
    from cellsam_rt.tools.bench import OurRunner, ReferenceRunner
    from cellsam_rt.pipeline.segmenter import Segmenter

    if side == "reference":
        return ReferenceRunner(checkpoint, image_512["image"], image_512["boxes"], True, threads,
                               0.4)
    # The backend's default memory arena: one for all sessions of this process.
    if side == "ours-int8":
        backend = bench_cache.int8_backend(model_dir, threads=threads)
    else:
        backend = bench_cache.cpu_backend(model_dir, threads,
                                          fused_attention=side != "ours-fp32-plain")
    backend.load()
    seg = Segmenter(model_dir, backend=backend, tile="never")
    return OurRunner(seg, image_512["path"], image_512["boxes"], True, out_dir=tmp_path)


@pytest.mark.parametrize("side", list(SIDES))
def test_e2e(benchmark, side, model_dir, checkpoint, image_512, threads, tmp_path):
    """One side's end-to-end latency per stage (read -> segment -> write)."""
    from cellsam_rt.tools.bench import rss_window

    rounds, warmup = SIDES[side]
    benchmark.group = "e2e-512-32boxes"
    runner = _runner(side, model_dir, checkpoint, image_512, threads, tmp_path)
    runs, mems = [], []

    def once():
        mem: dict = {}
        with rss_window(mem):
            runs.append(runner())
        mems.append(mem)

    benchmark.pedantic(once, rounds=rounds, warmup_rounds=warmup, iterations=1)
    labels = runner.last_result.labels
    LABELS[side] = labels
    info = {"runs": runs[warmup:], "memory": mems[warmup:],
            "total_median_s": float(np.median([r["total"] for r in runs[warmup:]]))}
    for other in LABELS:
        if other != side:
            info[f"labels_vs_{other}"] = agreement(labels, LABELS[other])
    benchmark.extra_info.update({k: v for k, v in info.items() if k not in ("runs", "memory")})
    record("e2e", side, info)
    # Drop this side's sessions (weights) before the next side loads.
    if side != "reference":
        runner.segmenter.backend.close()
    del runner
    gc.collect()
