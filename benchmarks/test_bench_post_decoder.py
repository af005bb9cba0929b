"""After the decoder: ROI paste (ours) vs full-frame upsampling of every mask (the reference).

2048x2048 image, 400 cells (>= 300): each cell's low-res logits [256,256] are a cone (+12 at
the centre, 0 at the rim, down to -20 outside), the shape a trained SAM decoder gives; random
weights would give arbitrary blobs. The same logits go through
- ours: cellsam_rt.stages.masks.paste_masks + postprocess.fill_holes_and_remove_small;
- reference: per mask, bilinear 256 -> 1024 -> 2048 + sigmoid > 0.4 on the CPU (torch, as
  cellsam_export.reference.decode_masks_per_box does after each decoder call), merge_masks,
  fill_holes_and_remove_small_masks. The merge runs 25 masks at a time: the reference's single
  np.max over all masks would need 400 x 2048^2 x 8 B = 13 GB here; chunking gives the same
  labels and is only faster.
Labels of both sides must be identical.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import RESULTS, record

S, LOW = 1024, 256
SIZES = {"full": (2048, 400), "tiny": (512, 36)}  # image side, cells
MERGE_CHUNK = 25
SECONDS: dict = {}
LABELS: dict = {}


def cone_logits(size: int, n_cells: int, seed: int = 0) -> np.ndarray:
    """[n, 256, 256] float32 low-res logits of round cells on a jittered grid."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_cells)))
    pitch = size / side
    yy, xx = np.mgrid[0:LOW, 0:LOW].astype(np.float32) + 0.5
    scale = LOW / size
    out = np.empty((n_cells, LOW, LOW), np.float32)
    for i in range(n_cells):
        gy, gx = divmod(i, side)
        cy = (gy + 0.5 + rng.uniform(-0.15, 0.15)) * pitch * scale
        cx = (gx + 0.5 + rng.uniform(-0.15, 0.15)) * pitch * scale
        r = rng.uniform(0.25, 0.4) * pitch * scale
        d = np.hypot(yy - cy, xx - cx)
        out[i] = np.clip(12.0 * (1.0 - d / r), -20.0, 12.0)
    return out


def ours(logits: np.ndarray, size: int) -> np.ndarray:
    """ROI paste of every mask, then the reference's hole filling."""
    from cellsam_rt.stages.masks import paste_masks
    from cellsam_rt.stages.postprocess import fill_holes_and_remove_small

    labels = np.zeros((size, size), np.int32)
    t0 = time.perf_counter()
    paste_masks(labels, logits, np.arange(1, len(logits) + 1, dtype=np.int32), S, 0.4)
    t1 = time.perf_counter()
    labels = fill_holes_and_remove_small(labels, min_size=25)
    SECONDS.setdefault("ours", []).append({"paste": t1 - t0,
                                           "postprocess": time.perf_counter() - t1})
    return labels


def reference(logits: np.ndarray, size: int) -> np.ndarray:
    """The reference's full-frame path on the same logits."""
    import torch
    from cellsam_export.reference import (fill_holes_and_remove_small_masks,
                                          upsample_mask_logits)

    t0 = time.perf_counter()
    masks = np.empty((len(logits), size, size), np.uint8)
    with torch.no_grad():
        for i, lg in enumerate(logits):
            full = upsample_mask_logits(torch.from_numpy(lg[None, None]), S, (size, size))
            masks[i] = (torch.sigmoid(full[0, 0]) > 0.4).numpy()
    t1 = time.perf_counter()
    labels = np.zeros((size, size), np.int64)
    for start in range(0, len(masks), MERGE_CHUNK):
        ids = np.arange(start + 1, start + 1 + len(masks[start:start + MERGE_CHUNK]),
                        dtype=np.int64)[:, None, None]
        np.maximum(labels, np.max(masks[start:start + MERGE_CHUNK] * ids, axis=0), out=labels)
    t2 = time.perf_counter()
    labels = fill_holes_and_remove_small_masks(labels, min_size=25)
    SECONDS.setdefault("reference", []).append({"upsample": t1 - t0, "merge": t2 - t1,
                                                "postprocess": time.perf_counter() - t2})
    return labels


@pytest.fixture(scope="module")
def logits(bench_config):
    """The cone logits and the image side for this model size."""
    size, n = SIZES[bench_config]
    return cone_logits(size, n), size


@pytest.mark.parametrize("side", ["ours", "reference"])
def test_post_decoder(benchmark, side, logits, threads):
    """Masks -> label image after the decoder, both ways; labels must agree."""
    lg, size = logits
    if side == "reference":
        import torch
        torch.set_num_threads(threads)
    benchmark.group = f"post-decoder-{size}px-{len(lg)}cells"
    fn = ours if side == "ours" else reference
    rounds = 3 if side == "ours" else 1
    result = benchmark.pedantic(fn, args=(lg, size), rounds=rounds, warmup_rounds=0,
                                iterations=1)
    LABELS[side] = result
    stage = SECONDS[side]
    totals = [sum(s.values()) for s in stage]
    info = {"image": size, "cells": len(lg), "median_s": float(np.median(totals)),
            "stages_s": {k: float(np.median([s[k] for s in stage])) for k in stage[0]}}
    if len(LABELS) == 2:
        info["labels_identical"] = bool(np.array_equal(LABELS["ours"].astype(np.int64),
                                                       LABELS["reference"].astype(np.int64)))
        mine = RESULTS.get("post_decoder", {}).get("ours")
        if side == "reference" and mine:
            info["speedup"] = info["median_s"] / mine["median_s"]
    benchmark.extra_info.update(info)
    record("post_decoder", side, info)
    assert info.get("labels_identical", True), "ROI paste and full-frame path disagree"
