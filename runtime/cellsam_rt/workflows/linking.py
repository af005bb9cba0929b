"""Overlap linking: mask IoU between consecutive frames, one-to-one by the Hungarian algorithm.

1. Same cell: pairs of cells in frames t and t+1 whose masks overlap with IoU >= min_iou are
   matched one-to-one at the least total cost (1 - IoU), scipy's linear_sum_assignment.
2. Division: a cell of t+1 left unmatched but partly covered (>= split_cover of its area) by a
   cell of t is that cell's daughter when the cell's other daughter is its match (or a second
   such cell); both daughters must be smaller than the mother (a real split, not a fragment).
   A lone covered cell is the mother itself after a large change of shape.
3. Gap closing: a track that ends and one that starts up to max_gap frames later are the same
   cell when their centroids lie within the ended cell's radius; again matched one-to-one.

Overlaps are counted sparsely over the pixels where both frames have a cell, so a frame pair
costs one pass over its pixels whatever the number of cells.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

Node = tuple[int, int]
_INFEASIBLE = 1e6
_DAUGHTER_MAX_AREA = 0.9  # each daughter is smaller than its mother


@dataclass
class _Frame:
    ids: np.ndarray  # sorted labels present
    area: np.ndarray
    cy: np.ndarray
    cx: np.ndarray

    @property
    def radius(self) -> np.ndarray:
        return np.sqrt(self.area / np.pi)


def _frame_stats(frame: np.ndarray) -> _Frame:
    flat = frame.ravel()
    fg = np.flatnonzero(flat)
    ids, inv = np.unique(flat[fg], return_inverse=True)
    area = np.bincount(inv, minlength=ids.size).astype(np.float64)
    yy, xx = np.divmod(fg, frame.shape[1])
    safe = np.maximum(area, 1)
    return _Frame(ids.astype(np.int64), area, np.bincount(inv, yy, ids.size) / safe,
                  np.bincount(inv, xx, ids.size) / safe)


def _overlaps(a: np.ndarray, b: np.ndarray, fa: _Frame, fb: _Frame):
    """(row in fa, row in fb, overlapping pixels) for every pair of cells that overlap."""
    both = (a > 0) & (b > 0)
    if not both.any() or not fa.ids.size or not fb.ids.size:
        e = np.zeros(0, np.int64)
        return e, e, e
    ia = np.searchsorted(fa.ids, a[both])
    ib = np.searchsorted(fb.ids, b[both])
    code, count = np.unique(ia.astype(np.int64) * fb.ids.size + ib, return_counts=True)
    ri, ci = np.divmod(code, fb.ids.size)
    return ri, ci, count.astype(np.int64)


def _assign(rows: np.ndarray, cols: np.ndarray, cost: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one matching of the candidate pairs at the least total cost."""
    if not rows.size:
        return []
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    m = np.full((ur.size, uc.size), _INFEASIBLE)
    m[ri, ci] = cost
    r, c = linear_sum_assignment(m)
    keep = m[r, c] < _INFEASIBLE
    return list(zip(ur[r[keep]].tolist(), uc[c[keep]].tolist()))


def _link_pair(t: int, fa: _Frame, fb: _Frame, ri, ci, ov, min_iou: float,
               split_cover: float) -> list[tuple[Node, Node]]:
    """Same-cell and division links between frames t and t+1."""
    iou = ov / (fa.area[ri] + fb.area[ci] - ov)
    ok = iou >= min_iou
    matches = dict(_assign(ri[ok], ci[ok], 1.0 - iou[ok]))  # row in a -> row in b
    matched_b = set(matches.values())
    # Unmatched cells of t+1 partly covered by one cell of t: candidate daughters.
    cover = ov / fb.area[ci]
    daughters: dict[int, list[tuple[float, int]]] = {}
    for i, j, c in zip(ri.tolist(), ci.tolist(), cover.tolist()):
        if c >= split_cover and j not in matched_b:
            daughters.setdefault(i, []).append((c, j))
    links = [(i, j) for i, j in matches.items()]
    for i, cands in daughters.items():
        cands.sort(reverse=True)
        cands = [(c, j) for c, j in cands if j not in matched_b]  # not taken meanwhile
        if not cands:
            continue
        small = [j for _, j in cands if fb.area[j] <= _DAUGHTER_MAX_AREA * fa.area[i]]
        if i in matches:
            k = matches[i]
            if small and fb.area[k] <= _DAUGHTER_MAX_AREA * fa.area[i]:
                links.append((i, small[0]))  # the match is one daughter, this the other
        elif len(small) >= 2:
            links += [(i, small[0]), (i, small[1])]
        else:
            links.append((i, cands[0][1]))  # the same cell, much changed in shape
            matches[i] = cands[0][1]
        matched_b.update(j for a, j in links if a == i)
    return [((t, int(fa.ids[i])), (t + 1, int(fb.ids[j]))) for i, j in links]


def _close_gaps(stats: list[_Frame], edges: list[tuple[Node, Node]],
                max_gap: int) -> list[tuple[Node, Node]]:
    """Links from track ends to track starts up to max_gap frames later (centroid distance)."""
    has_succ = {a for a, _ in edges}
    has_pred = {b for _, b in edges}
    T = len(stats)
    ends = {t: [k for k, lab in enumerate(stats[t].ids.tolist()) if (t, lab) not in has_succ]
            for t in range(T - 1)}
    closed: list[tuple[Node, Node]] = []
    used: set[Node] = set()
    for ts in range(2, T):
        starts = [k for k, lab in enumerate(stats[ts].ids.tolist()) if (ts, lab) not in has_pred]
        if not starts:
            continue
        cand = [(te, k) for te in range(max(0, ts - max_gap - 1), ts - 1)
                for k in ends[te] if (te, int(stats[te].ids[k])) not in used]
        if not cand:
            continue
        fs = stats[ts]
        sy, sx = fs.cy[starts], fs.cx[starts]
        rows, cols, cost = [], [], []
        for n, (te, k) in enumerate(cand):
            fe = stats[te]
            d = np.hypot(sy - fe.cy[k], sx - fe.cx[k]) / fe.radius[k]
            for m in np.flatnonzero(d <= 1.0):
                rows.append(n)
                cols.append(m)
                cost.append(d[m])
        for n, m in _assign(np.array(rows, np.int64), np.array(cols, np.int64),
                            np.array(cost)):
            te, k = cand[n]
            a = (te, int(stats[te].ids[k]))
            closed.append((a, (ts, int(fs.ids[starts[m]]))))
            used.add(a)
    return closed


def overlap_links(labels: np.ndarray, min_iou: float, max_gap: int, split_cover: float,
                  progress: Optional[Callable[[int, int], None]] = None
                  ) -> list[tuple[Node, Node]]:
    """All links of a (T, Y, X) label stack: same cell, divisions, closed gaps."""
    T = labels.shape[0]
    stats = [_frame_stats(labels[t]) for t in range(T)]
    edges: list[tuple[Node, Node]] = []
    for t in range(T - 1):
        ri, ci, ov = _overlaps(labels[t].ravel(), labels[t + 1].ravel(), stats[t], stats[t + 1])
        if ov.size:
            edges += _link_pair(t, stats[t], stats[t + 1], ri, ci, ov, min_iou, split_cover)
        if progress is not None:
            progress(t + 1, T - 1)
    if max_gap > 0:
        edges += _close_gaps(stats, edges, max_gap)
    return edges
