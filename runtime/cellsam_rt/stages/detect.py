"""Turning CellFinder outputs into box prompts (docs/design.md §2.6), and reading user-supplied boxes.

The reference decodes the set prediction with sigmoid + top-k, then picks a score threshold from a
2-cluster k-means (scikit-learn) of the top-k scores. scikit-learn is not a runtime dependency: we
re-enact its 1-D k-means in numpy (same seed, same steps) and also offer the exact 2-means split.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

DEFAULT_BBOX_THRESHOLD = 0.4


@dataclass(frozen=True)
class Detections:
    """Kept boxes (xyxy in model-input pixels, not clipped) and their scores, best first."""

    boxes: np.ndarray   # [K, 4] float32
    scores: np.ndarray  # [K] float32

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function; float32 in -> float32 out, as close to torch's float32 sigmoid as we can."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        # exp, 1+e and 1/(.) each correctly rounded to float32 (via float64): agrees with torch
        # on ~96% of inputs and is within 1 ulp elsewhere (numpy's float32 exp: ~83%).
        e = np.exp(-x.astype(np.float64)).astype(np.float32)
        d = (1.0 + e.astype(np.float64)).astype(np.float32)
        return (1.0 / d.astype(np.float64)).astype(np.float32)
    x = x.astype(np.float64, copy=False)
    return 1.0 / (1.0 + np.exp(-x))


def two_means_centres(scores: np.ndarray) -> Optional[Tuple[float, float]]:
    """Globally optimal 1-D 2-means centres (low, high), or None when there are < 2 points."""
    v = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = v.size
    if n < 2:
        return None
    if v[0] == v[-1]:
        return float(v[0]), float(v[0])  # one distinct value: both centres sit on it (as sklearn)
    # Sort + prefix sums: the best split minimises the within-cluster sum of squares. Centre the
    # data first so the sum-of-squares formula does not lose precision to cancellation.
    d = v - v.mean()
    s1 = np.cumsum(d)
    s2 = np.cumsum(d * d)
    k = np.arange(1, n)  # size of the low cluster
    left1, left2 = s1[:-1], s2[:-1]
    right1, right2 = s1[-1] - left1, s2[-1] - left2
    cost = (left2 - left1 * left1 / k) + (right2 - right1 * right1 / (n - k))
    cost[v[1:] == v[:-1]] = np.inf  # a split inside a run of equal values is no partition
    split = int(np.argmin(cost)) + 1
    return float(v[:split].mean()), float(v[split:].mean())


def _seq_sum32(x: np.ndarray) -> np.float32:
    """Left-to-right float32 sum (how sklearn's Lloyd loop accumulates a cluster)."""
    return np.cumsum(x, dtype=np.float32)[-1] if x.size else np.float32(0)


def _sq_dist32(x: np.ndarray, c: np.float32) -> np.ndarray:
    """k-means++ squared distances as sklearn computes them for float32 data (float64, then float32)."""
    x64, c64 = x.astype(np.float64), np.float64(c)
    d = -2 * (c64 * x64)
    d += c64 * c64
    d += x64 * x64
    return np.maximum(d.astype(np.float32), np.float32(0))


def sklearn_2means_centres(scores: np.ndarray, seed: int = 42, max_iter: int = 300,
                           tol: float = 1e-4) -> Optional[Tuple[float, float]]:
    """KMeans(n_clusters=2, random_state=seed).fit(scores) centres, re-enacted for 1-D float32 data.

    The reference's threshold comes from scikit-learn's Lloyd iterations from a k-means++ start,
    which may stop early (tol) or in a local optimum, so the exact 2-means solution can differ from
    it by up to a few 1e-2 on multimodal scores. This follows the same steps: the same RandomState
    draws, float32 data centred on its mean, float32 sums, the same stopping rules. Only BLAS and
    thread summation order are not reproduced (about 1e-7 on the centres). Deterministic.
    """
    x = np.asarray(scores, dtype=np.float32).reshape(-1, 1)
    n = x.shape[0]
    if n < 2:
        return None  # sklearn refuses n_samples < n_clusters; the reference keeps bbox_threshold
    tol32 = np.mean(np.var(x, axis=0)) * tol
    mean = x.mean(axis=0)
    xc = (x - mean)[:, 0]
    weight = np.ones(n, dtype=np.float32)
    rng = np.random.RandomState(seed)
    # k-means++ with 2 + int(log 2) = 2 local trials for the second centre.
    first = rng.choice(n, p=weight / weight.sum())
    closest = _sq_dist32(xc, xc[first])
    potential = np.float32(closest.astype(np.float64).sum())
    draws = rng.uniform(size=2) * potential
    cand = np.minimum(np.searchsorted(np.cumsum(weight * closest), draws), n - 1)
    pots = [np.minimum(closest, _sq_dist32(xc, xc[c])).astype(np.float64).sum() for c in cand]
    centres = np.array([xc[first], xc[cand[int(np.argmin(pots))]]], dtype=np.float32)
    if centres[0] == centres[1]:
        return float(centres[0] + mean[0]), float(centres[1] + mean[0])
    minus_two = np.float32(-2)
    labels_old = None
    for _ in range(max_iter):
        norms = centres * centres
        d0 = (minus_two * xc) * centres[0] + norms[0]
        d1 = (minus_two * xc) * centres[1] + norms[1]
        labels = d1 < d0  # ties go to centre 0 (first minimum)
        new = centres.copy()
        for j, member in enumerate((~labels, labels)):
            count = int(member.sum())
            if count:  # in 1-D a cluster cannot empty out once both centres differ
                alpha = np.float32(1.0 / np.float32(count))
                new[j] = _seq_sum32(np.where(member, xc, np.float32(0))) * alpha
        diff = new - centres
        shift = np.sqrt((diff * diff).astype(np.float64)).astype(np.float32)
        centres = new
        if labels_old is not None and np.array_equal(labels, labels_old):
            break  # strict convergence
        if (shift * shift).sum() <= tol32:
            break
        labels_old = labels
    out = centres + mean[0]
    return float(out[0]), float(out[1])


def kmeans_threshold(scores: np.ndarray, bbox_threshold: float = DEFAULT_BBOX_THRESHOLD,
                     method: str = "sklearn") -> float:
    """Adaptive score cut: 0.66*bbox_threshold + 0.33*mean(2-means centres) (reference rule).

    method="sklearn" reproduces the reference's KMeans(n_clusters=2, random_state=42) result;
    method="exact" uses the globally optimal 2-means split instead. Degenerate input: fewer than
    2 scores -> bbox_threshold (the reference skips k-means then); one distinct value v -> both
    centres are v, so 0.66*bbox_threshold + 0.33*v.
    """
    if method == "sklearn":
        centres = sklearn_2means_centres(scores)
    elif method == "exact":
        centres = two_means_centres(scores)
    else:
        raise ValueError(f"method must be 'sklearn' or 'exact', got {method!r}")
    if centres is None:
        return float(bbox_threshold)
    # Same dtype path as the reference: float32 centres, np.mean in float32, python-float mixing.
    cluster_mean = np.mean(np.asarray(centres, dtype=np.float32))
    return float(0.66 * bbox_threshold + 0.33 * cluster_mean)


def decode_detections(class_logits: np.ndarray, boxes_cxcywh: np.ndarray, S: int,
                      bbox_threshold: float = DEFAULT_BBOX_THRESHOLD,
                      topk: Optional[int] = None) -> Detections:
    """CellFinder outputs [Q,2], [Q,4] -> kept boxes in S-space, ordered by descending score.

    topk=None takes k = Q, what the reference's PostProcess does (k = num_queries = 3500 for
    CellSAM); k is capped at the Q*2 (query, class) pairs.
    """
    logits = np.asarray(class_logits, dtype=np.float32)
    boxes = np.asarray(boxes_cxcywh, dtype=np.float32)
    if logits.ndim != 2 or boxes.ndim != 2 or boxes.shape != (logits.shape[0], 4):
        raise ValueError(f"expected class_logits [Q,C] and boxes [Q,4], got {logits.shape} "
                         f"and {boxes.shape}")
    num_classes = logits.shape[1]
    prob = sigmoid(logits).ravel()
    k = min(logits.shape[0] if topk is None else int(topk), prob.size)
    # Descending, ties by ascending flat index (torch.topk's order on the inputs we tested).
    order = np.argsort(-prob, kind="stable")[:k]
    scores = prob[order]
    cx, cy, w, h = boxes[order // num_classes].T
    half = np.float32(0.5)
    xyxy = np.stack([cx - half * w, cy - half * h, cx + half * w, cy + half * h], axis=1)
    xyxy = xyxy * np.float32(S)
    thr = np.float32(kmeans_threshold(scores, bbox_threshold))
    keep = scores > thr if thr > 0 else np.ones(scores.shape, dtype=bool)
    return Detections(boxes=np.ascontiguousarray(xyxy[keep], dtype=np.float32),
                      scores=np.ascontiguousarray(scores[keep], dtype=np.float32))


_CSV_HEADERS = (("x1", "y1", "x2", "y2"), ("x0", "y0", "x1", "y1"), ("xmin", "ymin", "xmax", "ymax"))


def _box_row(values: Sequence, where: str) -> list:
    """Four finite numbers with x2 >= x1 and y2 >= y1, or ValueError naming `where`."""
    if len(values) != 4:
        raise ValueError(f"{where}: expected 4 values x1,y1,x2,y2, got {len(values)}")
    try:
        row = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: box values must be numbers, got {list(values)!r}") from None
    if not all(np.isfinite(row)):
        raise ValueError(f"{where}: box values must be finite, got {row}")
    if row[2] < row[0] or row[3] < row[1]:
        raise ValueError(f"{where}: box {row} has x2 < x1 or y2 < y1")
    return row


def _load_csv(path: Path) -> list:
    """Rows of a CSV box file (header optional)."""
    rows = []
    with path.open(newline="") as fh:
        lines = [(i, r) for i, r in enumerate(csv.reader(fh), start=1)
                 if r and any(c.strip() for c in r)]
    if not lines:
        return rows
    first_no, first = lines[0]
    header = [c.strip().lower() for c in first]
    columns = None
    for names in _CSV_HEADERS:
        if all(n in header for n in names):
            columns = [header.index(n) for n in names]
            lines = lines[1:]
            break
    else:
        try:
            [float(c) for c in first]
        except ValueError:
            raise ValueError(f"{path}:{first_no}: header must name x1,y1,x2,y2 (or x0,y0,x1,y1), "
                             f"got {first!r}") from None
    for line_no, r in lines:
        cells = [r[c] if c < len(r) else "" for c in columns] if columns else r
        rows.append(_box_row(cells, f"{path}:{line_no}"))
    return rows


def _load_json(path: Path) -> list:
    """Boxes from a JSON list of [x1,y1,x2,y2] / {"x1":..} objects, optionally under "boxes"."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if isinstance(data, dict):
        if "boxes" not in data:
            raise ValueError(f"{path}: JSON object has no \"boxes\" list")
        data = data["boxes"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of boxes")
    rows = []
    for i, item in enumerate(data):
        where = f"{path}: box {i}"
        if isinstance(item, dict):
            for names in _CSV_HEADERS:
                if all(n in item for n in names):
                    item = [item[n] for n in names]
                    break
            else:
                raise ValueError(f"{where}: object needs keys x1,y1,x2,y2, got {sorted(item)}")
        elif not isinstance(item, (list, tuple)):
            raise ValueError(f"{where}: expected [x1,y1,x2,y2] or an object, got {item!r}")
        rows.append(_box_row(item, where))
    return rows


def load_boxes(path: Union[str, Path]) -> np.ndarray:
    """Read user box prompts (xyxy image pixels) from CSV or JSON into float32 [K,4]."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: box file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = _load_json(path)
    elif suffix in (".csv", ".txt"):
        rows = _load_csv(path)
    else:
        raise ValueError(f"{path}: box files must be .csv or .json")
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def boxes_to_model_space(boxes: np.ndarray, image_hw: Tuple[int, int], S: int) -> np.ndarray:
    """Scale xyxy image-pixel boxes to S-space per axis (x by S/W, y by S/H), as predict() does."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    h, w = image_hw
    scale = np.array([S / w, S / h, S / w, S / h], dtype=np.float32)
    return boxes * scale
