"""Instance matching: the IoU of every (truth, prediction) pair and a one-to-one matching at a
threshold, shared by the evaluation (`tools/evaluate.py`) and test-time augmentation
(`pipeline/augment.py`).

Matching is the standard one (as in the DSB 2018 / StarDist / Cellpose evaluations): the IoU of
every (truth, prediction) pair comes from the contingency table of the two label images; pairs
with IoU >= threshold are candidates and a maximum matching is chosen among them (most matches,
then largest total IoU) with `scipy.optimize.linear_sum_assignment`. For thresholds above 0.5
this is the unique set of pairs with IoU >= threshold (an object can overlap at most one other
object by more than half of their union).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Matching", "iou_table", "match_instances"]


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
