"""Instance-segmentation accuracy: one-to-one matching, F1/precision/recall, `cellsam-rt evaluate`.

Matching is the standard one (as in the DSB 2018 / StarDist / Cellpose evaluations): the IoU of
every (truth, prediction) pair comes from the contingency table of the two label images; pairs
with IoU >= threshold are candidates and a maximum matching is chosen among them (most matches,
then largest total IoU) with `scipy.optimize.linear_sum_assignment`. For thresholds above 0.5
this is the unique set of pairs with IoU >= threshold (an object can overlap at most one other
object by more than half of their union).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

__all__ = ["Matching", "iou_table", "match_instances", "area_ratio", "evaluate", "THRESHOLDS", "truth_boxes",
           "pair_folder", "score_images", "mean_rows", "SUMMARY_KEYS"]

THRESHOLDS = (0.5, 0.75, 0.9)


@dataclass
class Matching:
    """One-to-one matching of predicted to true instances at one IoU threshold."""

    threshold: float
    n_true: int
    n_pred: int
    pairs: list = field(default_factory=list)  # (truth label, pred label, IoU), best first

    @property
    def tp(self) -> int:
        """Matched pairs."""
        return len(self.pairs)

    @property
    def fp(self) -> int:
        """Predictions without a match."""
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        """True instances without a match."""
        return self.n_true - self.tp

    @property
    def precision(self) -> float:
        """TP / predictions (1.0 when there is nothing to predict and nothing predicted)."""
        return self.tp / self.n_pred if self.n_pred else float(self.n_true == 0)

    @property
    def recall(self) -> float:
        """TP / true instances (1.0 when there are none and none are predicted)."""
        return self.tp / self.n_true if self.n_true else float(self.n_pred == 0)

    @property
    def f1(self) -> float:
        """2TP / (2TP + FP + FN)."""
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0

    @property
    def mean_iou(self) -> float:
        """Mean IoU of the matched pairs (0.0 without matches)."""
        return float(np.mean([p[2] for p in self.pairs])) if self.pairs else 0.0


def _check_labels(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label image, got shape {np.shape(a)}")
    if a.dtype.kind == "b":
        raise ValueError(f"{name} is a boolean mask; instance labels (integers) are needed")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{name} has non-integer values; expected an instance label image")
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} has dtype {a.dtype}; expected integer labels")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} has negative labels")
    return a


def iou_table(truth: np.ndarray, pred: np.ndarray):
    """(truth ids, pred ids, IoU of the overlapping pairs as (i, j, iou) arrays) from the contingency table."""
    return _table(truth, pred)[:3]


def _table(truth: np.ndarray, pred: np.ndarray):
    """iou_table's three values and the areas of the truth and pred ids."""
    truth = _check_labels(truth, "truth")
    pred = _check_labels(pred, "prediction")
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    t_ids, t_inv = np.unique(truth, return_inverse=True)
    p_ids, p_inv = np.unique(pred, return_inverse=True)
    t_inv, p_inv = t_inv.ravel(), p_inv.ravel()
    t_area = np.bincount(t_inv, minlength=len(t_ids))
    p_area = np.bincount(p_inv, minlength=len(p_ids))
    # Sparse contingency table: only the (truth, pred) pairs that share a pixel.
    pair = t_inv.astype(np.int64) * len(p_ids) + p_inv
    keys, inter = np.unique(pair, return_counts=True)
    ti, pj = keys // len(p_ids), keys % len(p_ids)
    fg = (t_ids[ti] != 0) & (p_ids[pj] != 0)
    ti, pj, inter = ti[fg], pj[fg], inter[fg]
    iou = inter / (t_area[ti] + p_area[pj] - inter)
    t_fg = t_ids != 0
    p_fg = p_ids != 0
    # Re-index so that 0..n-1 run over foreground labels only.
    t_pos = np.cumsum(t_fg) - 1
    p_pos = np.cumsum(p_fg) - 1
    return t_ids[t_fg], p_ids[p_fg], (t_pos[ti], p_pos[pj], iou), t_area[t_fg], p_area[p_fg]


def match_instances(pred: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> Matching:
    """One-to-one matching of predicted to true instances with IoU >= iou_threshold."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
    t_ids, p_ids, (ti, pj, iou) = iou_table(truth, pred)
    return _match(t_ids, p_ids, ti, pj, iou, iou_threshold)


def _match(t_ids, p_ids, ti, pj, iou, thr: float) -> Matching:
    cand = iou >= thr
    ti, pj, iou = ti[cand], pj[cand], iou[cand]
    m = Matching(threshold=float(thr), n_true=len(t_ids), n_pred=len(p_ids))
    if len(iou) == 0:
        return m
    if thr > 0.5:
        chosen = np.arange(len(iou))  # unique: each object has at most one candidate
    else:
        from scipy.optimize import linear_sum_assignment

        rows, r_inv = np.unique(ti, return_inverse=True)
        cols, c_inv = np.unique(pj, return_inverse=True)
        # Most matches first, then the largest IoU sum (each IoU term < 1 / n).
        cost = np.zeros((len(rows), len(cols)))
        cost[r_inv, c_inv] = -(1.0 + iou / (2.0 * len(iou)))
        r, c = linear_sum_assignment(cost)
        lookup = {(a, b): k for k, (a, b) in enumerate(zip(r_inv.tolist(), c_inv.tolist()))}
        chosen = np.array([lookup[(a, b)] for a, b in zip(r.tolist(), c.tolist()) if (a, b) in lookup],
                          dtype=np.int64)
    order = chosen[np.argsort(-iou[chosen], kind="stable")]
    m.pairs = [(int(t_ids[ti[k]]), int(p_ids[pj[k]]), float(iou[k])) for k in order]
    return m


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
