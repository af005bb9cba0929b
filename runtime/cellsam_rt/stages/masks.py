"""Mask decoding in bounded chunks and ROI-only mask upsampling (docs/design.md §2.7-2.8).

Where the model directory has a windowed decoder (`decoder_window`), a box whose window fits
(see `window_sides`) is decoded from a window of the embedding around it and its logits are
placed on a full low-resolution frame whose other pixels are far below the mask threshold.
Where that graph can paste a block (`paste_sides`), only the block around the box is upscaled;
a mask that reaches the block's edge is decoded again over its whole window.

The reference upsamples every mask's logits 256 -> S -> HxW at full resolution (two bilinear
interpolations, align_corners=False) and keeps sigmoid > 0.4. Both interpolations are linear and
separable, so each axis is one composite matrix A (out x in) and the full mask is A_y @ L @ A_x.T.
Bilinear weights are non-negative and sum to 1, so an output pixel is a convex combination of the
low-res logits in its footprint: it can only pass the threshold if some low-res logit in that
footprint does. We therefore evaluate only the output rows/cols whose footprint touches a low-res
row/col holding such a logit. Each output value is computed from its own taps in a fixed order,
so the ROI values are bit-identical to the full-frame values and the labels are exactly equal.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable, Iterator, Mapping, Optional, Tuple

import numpy as np

DEFAULT_MASK_THRESHOLD = 0.4
DEFAULT_IOU_THRESHOLD = 0.5
DEFAULT_CHUNK_SIZE = 64
#: low-res logit outside a box's decoder window: no bilinear mix with it reaches the threshold
OUTSIDE_WINDOW = -1.0e4
#: window sides are rounded up to a multiple of this (few distinct shapes per image)
WINDOW_STEP = 8
#: pasted block: this many times the box's longer side, plus a token each side, in steps of 4
DEFAULT_PASTE_FACTOR = 2.0
PASTE_STEP = 4
#: a pasted block whose edge holds a logit above the mask cutoff minus this is decoded again
#: over the whole window (the mask may go on past the block)
PASTE_EDGE_MARGIN = 2.0

RunFn = Callable[[str, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """1-D bilinear resampling (out x in) as torch's interpolate(align_corners=False) computes it."""
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    if in_size == out_size:
        m[rows, rows] = 1.0  # torch copies the input when the size does not change
        return m
    scale = in_size / out_size
    src = np.maximum((rows + 0.5) * scale - 0.5, 0.0)  # left edge clamps to the first pixel
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = i0 + (i0 < in_size - 1)  # right edge repeats the last pixel
    lam1 = np.clip(src - i0, 0.0, 1.0)
    np.add.at(m, (rows, i0), 1.0 - lam1)
    np.add.at(m, (rows, i1), lam1)
    return m


@lru_cache(maxsize=32)
def upsample_matrix(in_size: int, mid_size: int, out_size: int) -> np.ndarray:
    """Composite 1-D map (out x in) of bilinear in->mid then mid->out, float64, read-only."""
    a = _bilinear_matrix(mid_size, out_size) @ _bilinear_matrix(in_size, mid_size)
    a.flags.writeable = False
    return a


@lru_cache(maxsize=32)
def _taps(in_size: int, mid_size: int, out_size: int
          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse form of upsample_matrix: (index [out,K], weight [out,K], first_out [in], stop_out [in])."""
    a = upsample_matrix(in_size, mid_size, out_size)
    nz = a != 0
    rows = np.arange(out_size)
    lo = np.argmax(nz, axis=1)
    hi = in_size - 1 - np.argmax(nz[:, ::-1], axis=1)
    k = int((hi - lo).max()) + 1
    # Each output's taps: the contiguous input range lo..hi in ascending order (one fixed order
    # for every caller); padding taps get weight 0 and a valid index.
    index = lo[:, None] + np.arange(k)[None, :]
    valid = index <= hi[:, None]
    index = np.minimum(index, in_size - 1)
    weight = np.where(valid, a[rows[:, None], index], 0.0)
    # For each input position, the contiguous range of outputs whose footprint contains it.
    touched = nz.any(axis=0)
    first = np.where(touched, np.argmax(nz, axis=0), out_size)
    stop = np.where(touched, out_size - np.argmax(nz[::-1], axis=0), 0)
    for arr in (index, weight, first, stop):
        arr.flags.writeable = False
    return index, weight, first, stop


def _sigmoid32(v: np.float32) -> np.float32:
    """float32 1/(1+exp(-v)) with each step correctly rounded (torch's scalar CPU path)."""
    # float64 then one rounding per step; numpy's own float32 exp is off by an ulp here.
    e = np.float32(np.exp(-np.float64(v)))
    return np.float32(1.0 / np.float64(np.float32(1.0 + np.float64(e))))


def _ordered(v: float) -> int:
    """float32 -> integer with the same ordering (for bisection over representable values)."""
    i = int(np.array(v, dtype=np.float32).view(np.int32))
    return i if i >= 0 else -(i & 0x7FFFFFFF)


def _from_ordered(k: int) -> np.float32:
    """Inverse of _ordered."""
    bits = k if k >= 0 else (-k) | 0x80000000
    return np.array(bits, dtype=np.uint32).view(np.float32)[()]


@lru_cache(maxsize=8)
def _logit_cutoff(mask_threshold: float) -> np.float32:
    """Smallest float32 logit v with float32 sigmoid(v) > float32(mask_threshold)."""
    if not 0.0 < mask_threshold < 1.0:
        raise ValueError(f"mask_threshold must lie in (0, 1), got {mask_threshold}")
    thr = np.float32(mask_threshold)
    # Bisection over the float32 values between -100 and 100 (sigmoid saturates beyond).
    lo, hi = _ordered(-100.0), _ordered(100.0)  # sigmoid(lo) <= thr < sigmoid(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _sigmoid32(_from_ordered(mid)) > thr:
            hi = mid
        else:
            lo = mid
    return _from_ordered(hi)


def _upsample_block(logits: np.ndarray, ytaps, xtaps, r0: int, r1: int, c0: int, c1: int,
                    ) -> np.ndarray:
    """Upsampled logits of output rows r0:r1, cols c0:c1, float64 (rows first, then cols)."""
    yi, yw = ytaps[0][r0:r1], ytaps[1][r0:r1]
    xi, xw = xtaps[0][c0:c1], xtaps[1][c0:c1]
    # Only the low-res columns that feed c0:c1 are needed for the row pass.
    j0, j1 = int(xi.min()), int(xi.max()) + 1
    src = logits[:, j0:j1].astype(np.float64)
    rows = yw[:, 0, None] * src[yi[:, 0]]
    for t in range(1, yi.shape[1]):
        rows += yw[:, t, None] * src[yi[:, t]]
    xi = xi - j0
    out = rows[:, xi[:, 0]] * xw[:, 0]
    for t in range(1, xi.shape[1]):
        out += rows[:, xi[:, t]] * xw[:, t]
    return out


def _passes(values: np.ndarray, cutoff: np.float32) -> np.ndarray:
    """The reference's test sigmoid(float32 logit) > threshold, on float64 upsampled logits."""
    return values.astype(np.float32) >= cutoff


def paste_masks(labels_out: np.ndarray, logits_chunk: np.ndarray, labels_for_chunk: np.ndarray,
                S: int, mask_threshold: float = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    """Threshold each mask at full resolution inside its reachable ROI and merge it into labels_out.

    Merging takes the maximum label per pixel, which is the reference's max(k * mask_k) rule, so
    the result does not depend on paste order. labels_out is modified in place and returned.
    """
    logits_chunk = np.asarray(logits_chunk)
    if logits_chunk.ndim == 4:
        logits_chunk = logits_chunk[:, 0]
    labels_for_chunk = np.asarray(labels_for_chunk).reshape(-1)
    if logits_chunk.shape[0] != labels_for_chunk.shape[0]:
        raise ValueError(f"{logits_chunk.shape[0]} masks but {labels_for_chunk.shape[0]} labels")
    if labels_for_chunk.size and labels_for_chunk.max() > np.iinfo(labels_out.dtype).max:
        raise ValueError(f"label {labels_for_chunk.max()} does not fit {labels_out.dtype}")
    height, width = labels_out.shape
    mh, mw = logits_chunk.shape[1:]
    ytaps = _taps(mh, S, height)
    xtaps = _taps(mw, S, width)
    cutoff = _logit_cutoff(float(mask_threshold))
    # Any low-res logit that could reach the cutoff after a convex combination; the small margin
    # only widens the ROI (float rounding of the weights cannot then hide a passing pixel).
    candidate = np.float32(cutoff) - np.float32(1e-3) * max(1.0, abs(float(cutoff)))
    for logits, label in zip(logits_chunk, labels_for_chunk):
        hot = logits >= candidate
        hot_rows = np.flatnonzero(hot.any(axis=1))
        if hot_rows.size == 0:
            continue
        hot_cols = np.flatnonzero(hot.any(axis=0))
        r0, r1 = int(ytaps[2][hot_rows].min()), int(ytaps[3][hot_rows].max())
        c0, c1 = int(xtaps[2][hot_cols].min()), int(xtaps[3][hot_cols].max())
        if r1 <= r0 or c1 <= c0:
            continue
        inside = _passes(_upsample_block(logits, ytaps, xtaps, r0, r1, c0, c1), cutoff)
        window = labels_out[r0:r1, c0:c1]
        np.maximum(window, np.where(inside, label, 0).astype(labels_out.dtype), out=window)
    return labels_out


def full_frame_masks(logits: np.ndarray, S: int, height: int, width: int,
                     mask_threshold: float = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    """Full-resolution binary masks [k,H,W] bool: the slow path paste_masks avoids (tests, benchmarks)."""
    logits = np.asarray(logits)
    if logits.ndim == 4:
        logits = logits[:, 0]
    ytaps = _taps(logits.shape[1], S, height)
    xtaps = _taps(logits.shape[2], S, width)
    cutoff = _logit_cutoff(float(mask_threshold))
    out = np.zeros((logits.shape[0], height, width), dtype=bool)
    for i, lg in enumerate(logits):
        out[i] = _passes(_upsample_block(lg, ytaps, xtaps, 0, height, 0, width), cutoff)
    return out


def window_sides(boxes: np.ndarray, size: int, grid: int, policy: Mapping[str, float]
                 ) -> np.ndarray:
    """Each box's decoder window side in embedding tokens (0: the full-frame decoder).

    The side is `box_factor` times the box's longer side, at least `min`, rounded up to a
    multiple of WINDOW_STEP; a box that would need more than `max` uses the full frame.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * grid / size
    need = np.maximum(np.ceil(policy["box_factor"] * side), policy["min"])
    need = np.ceil(need / WINDOW_STEP) * WINDOW_STEP
    need = np.minimum(need, grid)  # rounding may pass the grid; the grid is the whole frame
    return np.where(need <= policy["max"], need, 0).astype(np.int64)


def window_origins(boxes: np.ndarray, sides: np.ndarray, size: int, grid: int) -> np.ndarray:
    """Top-left token (row, col) of each box's window: centred on the box, inside the grid."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 * grid / size
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 * grid / size
    top = np.clip(np.round(cy - sides / 2), 0, grid - sides)
    left = np.clip(np.round(cx - sides / 2), 0, grid - sides)
    return np.stack([top, left], axis=1).astype(np.int64)


def paste_sides(boxes: np.ndarray, sides: np.ndarray, size: int, grid: int, factor: float
                ) -> np.ndarray:
    """Each windowed box's pasted block side in tokens: `factor` times its longer side plus a
    token each side, rounded up to a multiple of PASTE_STEP, at most its window side."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * grid / size
    need = np.ceil((np.ceil(factor * side) + 2) / PASTE_STEP) * PASTE_STEP
    return np.minimum(need, sides).astype(np.int64)


def paste_origins(boxes: np.ndarray, blocks: np.ndarray, origins: np.ndarray, sides: np.ndarray,
                  size: int, grid: int) -> np.ndarray:
    """Top-left token of each pasted block inside its window: centred on the box, inside the window."""
    centred = window_origins(boxes, blocks, size, grid)  # in the grid
    return np.clip(centred - origins, 0, (sides - blocks)[:, None]).astype(np.int64)


def window_options(backend, policy: Optional[Mapping[str, float]]) -> dict:
    """decode_masks' window arguments for a backend (anything with `graph_inputs` and
    `concurrent_runs`) and a model's decoder_window policy (None: no windowed decoder)."""
    if policy is None:
        return {"window": None}
    pastes = "paste" in backend.graph_inputs("decoder_window")
    return {"window": policy, "workers": backend.concurrent_runs("decoder_window"),
            "paste": float(policy.get("paste_factor", DEFAULT_PASTE_FACTOR)) if pastes else None}


def _window_cells(side: int, grid: int) -> np.ndarray:
    """Flat token offsets i*grid + j of a side x side window (the graph's `cells` input)."""
    ar = np.arange(side, dtype=np.int64)
    return ar[:, None] * grid + ar[None, :]


def _decode_windows(run: RunFn, embeddings: np.ndarray, boxes: np.ndarray,
                    box_image: np.ndarray, sides: np.ndarray, size: int, grid: int,
                    chunk_size: int, paste: Optional[float] = None,
                    mask_threshold: float = DEFAULT_MASK_THRESHOLD, workers: int = 1
                    ) -> tuple[dict, dict]:
    """Run the windowed decoder over every box with a window: index -> (logits, token origin
    of the logits), iou.

    A call takes as many boxes as hold the tokens of `chunk_size` full-frame boxes, so memory per
    call stays what the chunk size bounds. `paste` (a graph with paste inputs): the factor of
    `paste_sides`; blocks whose edge comes near the mask cutoff are decoded again whole.
    `workers` calls run at once (the backend's `concurrent_runs`)."""
    origins = window_origins(boxes, sides, size, grid)
    blocks, inner = sides.copy(), np.zeros_like(origins)
    if paste is not None:
        blocks = paste_sides(boxes, sides, size, grid, paste)
        inner = paste_origins(boxes, blocks, origins, sides, size, grid)
    edge = np.float32(_logit_cutoff(float(mask_threshold)) - PASTE_EDGE_MARGIN)

    def call(part: np.ndarray, side: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        emb, local = _used_embeddings(embeddings, box_image[part])
        feeds = {"embeddings": emb, "boxes": np.ascontiguousarray(boxes[part]),
                 "box_image": np.ascontiguousarray(local, dtype=np.int64),
                 "origin": np.ascontiguousarray(origins[part]), "cells": _window_cells(side, grid)}
        if paste is not None:
            feeds.update(paste=np.ascontiguousarray(inner[part]),
                         paste_cells=_window_cells(block, side))
        out = run("decoder_window", feeds)
        lg = np.asarray(out["mask_logits"], dtype=np.float32)
        return (lg.reshape(lg.shape[0], lg.shape[-2], lg.shape[-1]),
                np.asarray(out["iou"], dtype=np.float32).reshape(-1))

    def plan(todo: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
        """Calls of the boxes `todo`, grouped by (window side, block side)."""
        calls = []
        for side, block in sorted({(int(sides[i]), int(blocks[i])) for i in todo}):
            idx = todo[(sides[todo] == side) & (blocks[todo] == block)]
            per_call = max(chunk_size, int(chunk_size * grid * grid / (side * side)))
            calls += [(idx[s:s + per_call], side, block) for s in range(0, len(idx), per_call)]
        return calls

    calls = plan(np.flatnonzero(sides > 0))
    logits_of, iou_of = {}, {}
    pool = ThreadPoolExecutor(workers) if workers > 1 and len(calls) > 1 else None
    try:
        while calls:
            again = []
            results = (pool.map(lambda c: call(*c), calls) if pool
                       else (call(*c) for c in calls))
            for (part, side, block), (lg, iou) in zip(calls, results):
                for k, i in enumerate(part):
                    if block < side and _edge_reached(lg[k], edge, inner[i], block, side):
                        again.append(int(i))  # decoded again over its whole window
                        continue
                    logits_of[int(i)] = (lg[k], origins[i] + inner[i])
                    iou_of[int(i)] = iou[k]
            again = np.asarray(again, dtype=np.int64)
            blocks[again], inner[again] = sides[again], 0
            calls = plan(again)
    finally:
        if pool:
            pool.shutdown()
    return logits_of, iou_of


def _edge_reached(logits: np.ndarray, edge: np.float32, inner: np.ndarray, block: int,
                  side: int) -> bool:
    """Whether a pasted block's outermost low-res pixels come near the mask cutoff, on the
    sides where the window goes on past the block."""
    (top, left), far = inner, side - block
    return bool((top > 0 and (logits[0] >= edge).any())
                or (top < far and (logits[-1] >= edge).any())
                or (left > 0 and (logits[:, 0] >= edge).any())
                or (left < far and (logits[:, -1] >= edge).any()))


def decode_masks(run: RunFn, embeddings: np.ndarray, boxes: np.ndarray, box_image: np.ndarray,
                 chunk_size: int = DEFAULT_CHUNK_SIZE,
                 iou_threshold: float = DEFAULT_IOU_THRESHOLD,
                 window: Optional[Mapping[str, float]] = None, size: Optional[int] = None,
                 paste: Optional[float] = None, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
                 workers: int = 1) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Run the decoder over boxes in chunks; yield (kept box indices, logits [k,m,m], iou [k]).

    The decoder graph holds a copy of the image embedding per box, so chunking bounds its memory.
    Only the embeddings a chunk refers to are passed (box_image is remapped accordingly). Masks
    with predicted IoU below iou_threshold are dropped, as the reference does.

    `window` (the model's decoder_window policy, with `size` the model input side) sends every
    box whose window fits to the windowed decoder; chunks still come in box order. `paste` is
    for a windowed graph with paste inputs: the block factor (`paste_sides`; `mask_threshold`
    decides when a block is too small). Up to `workers` windowed calls run at once.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    embeddings = np.asarray(embeddings, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    box_image = np.asarray(box_image, dtype=np.int64).reshape(-1)
    if box_image.shape[0] != boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {box_image.shape[0]} box_image entries")
    if box_image.size and (box_image.min() < 0 or box_image.max() >= embeddings.shape[0]):
        raise ValueError(f"box_image refers to embeddings outside 0..{embeddings.shape[0] - 1}")
    iou_thr = np.float32(iou_threshold)
    grid = embeddings.shape[-1]
    m = 4 * grid  # low-res mask side
    sides = np.zeros(len(boxes), dtype=np.int64)
    if window is not None and len(boxes):
        if size is None:
            raise ValueError("a decoder window needs the model input size")
        sides = window_sides(boxes, size, grid, window)
    win_logits, win_iou = (_decode_windows(run, embeddings, boxes, box_image, sides, size, grid,
                                           chunk_size, paste, mask_threshold, workers)
                           if sides.any() else ({}, {}))
    for start in range(0, boxes.shape[0], chunk_size):
        stop = min(start + chunk_size, boxes.shape[0])
        logits = np.empty((stop - start, m, m), dtype=np.float32)
        iou = np.empty(stop - start, dtype=np.float32)
        full = np.flatnonzero(sides[start:stop] == 0)
        if full.size:
            lg, io = _decode_full(run, embeddings, boxes[start + full], box_image[start + full])
            logits[full], iou[full] = lg, io
        for k in np.flatnonzero(sides[start:stop] > 0):
            lg, (top, left) = win_logits.pop(start + int(k))
            logits[k] = OUTSIDE_WINDOW
            logits[k, 4 * top:4 * top + lg.shape[0], 4 * left:4 * left + lg.shape[1]] = lg
            iou[k] = win_iou.pop(start + int(k))
        keep = ~(iou < iou_thr)  # reference: drop when iou < threshold
        yield np.arange(start, stop, dtype=np.int64)[keep], logits[keep], iou[keep]


def _decode_full(run: RunFn, embeddings: np.ndarray, boxes: np.ndarray, images: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The full-frame decoder on some boxes: (logits [k,m,m], iou [k])."""
    chunk_emb, local = _used_embeddings(embeddings, images)
    out = run("decoder", {"embeddings": chunk_emb, "boxes": np.ascontiguousarray(boxes),
                          "box_image": np.ascontiguousarray(local, dtype=np.int64)})
    logits = np.asarray(out["mask_logits"], dtype=np.float32)
    logits = logits.reshape(logits.shape[0], logits.shape[-2], logits.shape[-1])
    return logits, np.asarray(out["iou"], dtype=np.float32).reshape(-1)


def _used_embeddings(embeddings: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Only the embeddings a call's boxes refer to (the graphs read every image they are given),
    with the boxes' image indices into them."""
    used, local = np.unique(images, return_inverse=True)
    if used.size == embeddings.shape[0]:
        return embeddings, images
    if used[-1] - used[0] + 1 == used.size:  # a contiguous run: a view, no copy
        return embeddings[used[0]:used[-1] + 1], images - used[0]
    return embeddings[used], local
