"""Instance-segmentation accuracy: F1/precision/recall at several IoU thresholds over the
standard one-to-one matching (`stages/matching.py`), `cellsam-rt evaluate`."""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from cellsam_rt.stages.matching import (Matching, _check_labels, _match, _table, iou_table,
                                        match_instances)

__all__ = ["Matching", "iou_table", "match_instances", "area_ratio", "evaluate", "THRESHOLDS", "truth_boxes",
           "pair_folder", "score_images", "mean_rows", "SUMMARY_KEYS"]

THRESHOLDS = (0.5, 0.75, 0.9)


def area_ratio(pairs, true_area: dict, pred_area: dict) -> Optional[float]:
    """Median predicted / true area over matched (truth, prediction, IoU) pairs (areas by label
    id), None without pairs: above 1, masks are drawn wider than the truth's outlines; below 1,
    tighter. Datasets draw outlines differently (on or inside a blurred edge), which caps the IoU
    of any one rule."""
    if not pairs:
        return None
    return float(np.median([pred_area[j] / true_area[i] for i, j, _ in pairs]))


def evaluate(pred: np.ndarray, truth: np.ndarray,
             thresholds: Iterable[float] = THRESHOLDS) -> dict:
    """Scores of a label image against the truth: F1 at each IoU threshold, P/R, mean IoU and
    area ratio at 0.5."""
    t_ids, p_ids, table, t_area, p_area = _table(truth, pred)
    out = {"n_true": int(len(t_ids)), "n_pred": int(len(p_ids))}
    per = {}
    for thr in sorted({0.5, *[float(t) for t in thresholds]}):
        m = _match(t_ids, p_ids, *table, thr)
        per[thr] = m
        out[f"f1@{thr:g}"] = m.f1
    m50 = per[0.5]
    out.update(precision=m50.precision, recall=m50.recall, mean_iou=m50.mean_iou,
               area_ratio=area_ratio(m50.pairs, dict(zip(t_ids.tolist(), t_area.tolist())),
                                     dict(zip(p_ids.tolist(), p_area.tolist()))),
               tp=m50.tp, fp=m50.fp, fn=m50.fn)
    return out


# --------------------------------------------------------------------------------------------
# A folder of images with ground truth

SUMMARY_KEYS = ("f1@0.5", "f1@0.75", "f1@0.9", "precision", "recall", "mean_iou")


def truth_boxes(truth: np.ndarray) -> np.ndarray:
    """[N,4] xyxy boxes (full pixel extent: x0, y0, x1 + 1, y1 + 1) of the truth's instances."""
    from scipy import ndimage

    truth = _check_labels(truth, "truth")
    boxes = [[sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]
             for sl in ndimage.find_objects(truth) if sl is not None]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def pair_folder(images_dir, truth_dir) -> list:
    """(name, image path, truth path) of every image in `images_dir` with a truth file of the same
    stem in `truth_dir`; an image without truth, or no image at all, raises ImageReadError."""
    from pathlib import Path

    from cellsam_rt.errors import ImageReadError
    from cellsam_rt.io.images import is_image_file

    images_dir, truth_dir = Path(images_dir), Path(truth_dir)
    for d in (images_dir, truth_dir):
        if not d.is_dir():
            raise ImageReadError(d, "is not a folder (with --images, --truth names a folder too)")
    truths = {p.stem: p for p in sorted(truth_dir.iterdir()) if p.is_file() and is_image_file(p)}
    pairs = []
    for p in sorted(images_dir.iterdir()):
        if not (p.is_file() and is_image_file(p)):
            continue
        if p.stem not in truths:
            raise ImageReadError(p, f"no truth file named {p.stem}.* in {truth_dir}")
        pairs.append((p.stem, p, truths[p.stem]))
    if not pairs:
        raise ImageReadError(images_dir, "folder contains no image files")
    return pairs


def score_images(pairs, segmenter=None, baseline: bool = False, with_truth_boxes: bool = False,
                 channels=None, read=None, progress=None) -> list[dict]:
    """Per-image score rows ({"image", "method", scores..., "seconds"}) of the model (detected
    boxes; with `with_truth_boxes` also prompted with the truth's boxes, which scores the masks
    apart from detection) and of the classical baseline, for (name, image, truth) triples."""
    import time

    if read is None:
        from cellsam_rt.io import read_image as read
    rows = []
    name = None
    if segmenter is not None:
        manifest = getattr(getattr(segmenter, "model_dir", None), "manifest", None) or {}
        name = str(manifest.get("name", "model"))
    for image_name, image_path, truth_path in pairs:
        image = read(image_path)
        truth = _check_labels(read(truth_path), f"truth {truth_path}")
        runs = []
        if segmenter is not None:
            runs.append((name, lambda: segmenter.segment(image, channels=channels).labels))
            if with_truth_boxes:
                boxes = truth_boxes(truth)
                runs.append((f"{name} (truth boxes)",
                             lambda: segmenter.segment(image, channels=channels, boxes=boxes).labels))
        if baseline:
            from cellsam_rt.tools.baseline import otsu_watershed

            runs.append(("otsu+watershed", lambda: otsu_watershed(image, channels=channels)))
        for method, fn in runs:
            t0 = time.perf_counter()
            labels = fn()
            rows.append({"image": image_name, "method": method, **evaluate(labels, truth),
                         "seconds": time.perf_counter() - t0})
            if progress is not None:
                progress(rows[-1])
    return rows


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per method: the mean over images of each score (image "mean", n = images; the
    mean matched IoU over the images with at least one match)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        mean = {k: float(np.mean([r[k] for r in mine])) for k in SUMMARY_KEYS + ("seconds",)
                if all(k in r for r in mine)}
        # Mean matched IoU is defined only where something matched: average those images.
        matched = [r["mean_iou"] for r in mine if r.get("tp", 1) > 0]
        mean["mean_iou"] = float(np.mean(matched)) if matched else 0.0
        ratios = [r["area_ratio"] for r in mine if r.get("area_ratio") is not None]
        mean["area_ratio"] = float(np.mean(ratios)) if ratios else None
        out.append({"image": "mean", "method": method, **mean,
                    "n_true": int(sum(r["n_true"] for r in mine)),
                    "n_pred": int(sum(r["n_pred"] for r in mine)), "images": len(mine)})
    return out
