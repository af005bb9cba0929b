"""Test-time augmentation (`--augment flips`): the image segmented as given and mirrored, and an
object kept where the views agree.

The detector's false detections (texture, haze, the gap between two nuclei) seldom recur at the
same place when the image is mirrored, and a nucleus one view misses is often found by the others.
`segment_flips` segments the image in four orientations (as given, flipped top to bottom, left
to right, both), maps each view's labels back, and counts for each object the views that found it
(IoU >= 0.5, one-to-one, as the evaluation matches). Objects found in at least `MIN_VOTES` views
are kept: the given view's masks first, then each other view's agreed objects that none kept so
far matches, painted where they do not overlap kept ones. Each view is a whole segmentation
(its own scale, polarity and outline decisions), so an image costs four.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
from scipy import ndimage

from cellsam_rt.pipeline.results import SegmentationResult
from cellsam_rt.stages.matching import match_instances
from cellsam_rt.stages.postprocess import cell_table, label_dtype
from cellsam_rt.stages.preprocess import channels_last

__all__ = ["FLIPS", "MIN_VOTES", "MIN_FREE", "merge_views", "segment_flips"]

#: the views besides the image as given: the image axes (rows, columns) each one mirrors
FLIPS = ((0,), (1,), (0, 1))
#: views (of four) that must find an object for it to be kept
MIN_VOTES = 2
#: an object added from a mirrored view keeps at least this share of its pixels clear of the
#: objects kept before it (else it is a duplicate drawn differently, and is left out)
MIN_FREE = 0.7


def _votes(labels: list[np.ndarray]) -> list[set]:
    """For each label image, its labels that at least MIN_VOTES of them hold (itself included)."""
    count = [dict() for _ in labels]
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            for a, b, _ in match_instances(labels[j], labels[i]).pairs:
                count[i][a] = count[i].get(a, 0) + 1
                count[j][b] = count[j].get(b, 0) + 1
    return [{k for k, n in c.items() if n + 1 >= MIN_VOTES} for c in count]


def merge_views(views: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels, label ids, boxes, scores) agreed on by `views`, each such a tuple in the image's
    own orientation (the first: the image as given). Kept objects of the first view keep their
    label values; added ones are numbered after them."""
    labels = [np.asarray(v[0]) for v in views]
    votes = _votes(labels)
    first_ids = np.asarray(views[0][1], np.int64)
    keep = np.isin(first_ids, list(votes[0]))
    out = np.where(np.isin(labels[0], first_ids[keep]), labels[0], 0).astype(np.int32)
    ids = list(first_ids[keep])
    boxes = list(np.asarray(views[0][2], np.float32).reshape(-1, 4)[keep])
    scores = list(np.asarray(views[0][3], np.float32)[keep])
    nxt = int(out.max(initial=0)) + 1
    for view, agreed, lab in zip(views[1:], votes[1:], labels[1:]):
        taken = {int(b) for _, b, _ in match_instances(lab, out).pairs}
        where = ndimage.find_objects(lab)
        for value, box, score in zip(view[1], np.asarray(view[2]).reshape(-1, 4), view[3]):
            value = int(value)
            if value not in agreed or value in taken or where[value - 1] is None:
                continue
            crop = where[value - 1]
            mine = lab[crop] == value
            free = mine & (out[crop] == 0)
            if free.sum() < MIN_FREE * mine.sum():
                continue
            out[crop][free] = nxt
            ids.append(nxt)
            boxes.append(np.asarray(box, np.float32))
            scores.append(np.float32(score))
            nxt += 1
    return (out, np.asarray(ids, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(scores, np.float32))


def _unflipped(result: SegmentationResult, axes: tuple, hw: tuple[int, int]) -> tuple:
    """A view's (labels, ids, boxes, scores) in the image's own orientation (`axes` mirrored)."""
    boxes = np.array(result.boxes, np.float32).reshape(-1, 4)
    h, w = hw
    if 0 in axes:
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    if 1 in axes:
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    return np.flip(result.labels, axes), result.label_ids, boxes, result.scores


def segment_flips(segment: Callable[[np.ndarray], SegmentationResult], image: np.ndarray,
                  first: SegmentationResult) -> SegmentationResult:
    """The agreed result of `first` (the image as given, segmented) and `segment` (one image ->
    its result) on the three mirrored views of `image`."""
    t0 = time.perf_counter()
    img = channels_last(image)
    hw = img.shape[:2]
    timings: dict = {}
    views = []
    for axes in ((),) + FLIPS:
        r = first if not axes else segment(np.ascontiguousarray(np.flip(img, axes)))
        views.append(_unflipped(r, axes, hw))
        for k, v in r.timings.items():  # each stage's time summed over the views
            if k != "total":
                timings[k] = timings.get(k, 0.0) + v
    t_merge = time.perf_counter()
    labels, ids, boxes, scores = merge_views(views)
    labels = labels.astype(label_dtype(int(labels.max(initial=0))), copy=False)
    table = cell_table(labels, img, {int(k): float(s) for k, s in zip(ids, scores)})
    timings["augment"] = time.perf_counter() - t_merge
    timings["total"] = first.timings.get("total", 0.0) + time.perf_counter() - t0
    return SegmentationResult(labels=labels, label_ids=ids, boxes=boxes, scores=scores,
                              table=table, timings=timings, tiled=first.tiled, scale=first.scale)
