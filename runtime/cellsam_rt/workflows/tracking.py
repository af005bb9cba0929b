"""Link segmented cells over time: tracks, divisions and lineages from a (T, Y, X) label stack.

A linker turns the cells of a movie into links between cells of different frames: a cell with
two later links divided, a link that skips frames closes a gap (a missed detection or empty
frames). `link` then assigns track ids the Cell Tracking Challenge way: a track is an unbroken
run of one cell through consecutive frames; after a division each daughter starts a new track
whose parent is the mother, and after a gap the cell continues under a new track id whose
parent is the track before the gap. The output label stack carries the track id in every pixel.

Linkers (`method=`):
  * "overlap" (default): mask overlap (IoU) between consecutive frames, matched one-to-one by
    the Hungarian algorithm (scipy); a new cell partly covered by the previous frame's cell
    that continues makes a division; gaps closed on centroid distance.
    See `workflows/linking.py`.
  * "laptrack-overlap": laptrack's OverLapTrack (overlap-based LAP with splitting and gap
    closing) with the same thresholds.
  * "laptrack-centroid": laptrack's LapTrack on centroids (distance-based LAP).
docs/tracking.md compares them on generated movies (accuracy and speed).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..io.outputs import check_labels

METHODS = ("overlap", "laptrack-overlap", "laptrack-centroid")
DEFAULT_MIN_IOU = 0.3
DEFAULT_MAX_GAP = 2
DEFAULT_SPLIT_COVER = 0.35  # a daughter lies at least 35% inside its mother's last mask

Node = tuple[int, int]  # (frame, label in that frame)


@dataclass
class TrackingResult:
    """Tracks of a movie: relabelled masks and the CTC lineage table."""

    labels: np.ndarray  # (T, Y, X) track ids
    tracks: np.ndarray  # (N, 4) rows L B E P (label, begin, end, parent; 0 = none)

    @property
    def parents(self) -> dict[int, int]:
        return {int(l): int(p) for l, _, _, p in self.tracks}

    @property
    def n_tracks(self) -> int:
        return len(self.tracks)

    def lineage(self) -> dict:
        return lineage_summary(self.tracks)


def link(labels: np.ndarray, method: str = "overlap", min_iou: float = DEFAULT_MIN_IOU,
         max_gap: int = DEFAULT_MAX_GAP,
         progress: Optional[Callable[[int, int], None]] = None) -> TrackingResult:
    """Link the cells of a (T, Y, X) integer label stack into tracks.

    `min_iou`: the least mask IoU for two cells of consecutive frames to be the same cell.
    `max_gap`: the most frames a cell may be missing and still continue its lineage (0 = none).
    `progress(done, total)` is called once per frame pair.
    """
    labels = check_labels(labels, 3, "a (T, Y, X) label stack")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 < min_iou <= 1.0 or max_gap < 0:
        raise ValueError(f"need 0 < min_iou <= 1 and max_gap >= 0, got {min_iou}, {max_gap}")
    if method == "overlap":
        from .linking import overlap_links
        edges = overlap_links(labels, min_iou, max_gap, DEFAULT_SPLIT_COVER, progress)
    elif method == "laptrack-overlap":
        edges = _laptrack_overlap_links(labels, min_iou, max_gap)
    else:
        edges = _laptrack_centroid_links(labels, max_gap)
    return tracks_from_links(labels, edges)


def tracks_from_links(labels: np.ndarray, edges: list[tuple[Node, Node]]) -> TrackingResult:
    """CTC tracks from links: runs through consecutive frames; divisions and gaps start tracks."""
    succ: dict[Node, list[Node]] = defaultdict(list)
    pred: dict[Node, Node] = {}
    for a, b in edges:
        a, b = (a, b) if a[0] < b[0] else (b, a)
        if b in pred:  # a merge: keep the first link (linkers here do not merge)
            continue
        succ[a].append(b)
        pred[b] = a
    T = labels.shape[0]
    frame_ids = [np.unique(labels[t]) for t in range(T)]
    track_of: dict[Node, int] = {}
    rows: dict[int, list[int]] = {}
    next_id = 1
    luts = []
    for t in range(T):
        ids = frame_ids[t][frame_ids[t] > 0]
        new = np.zeros(len(ids), np.int64)
        for k, lab in enumerate(ids.tolist()):
            node = (t, lab)
            p = pred.get(node)
            if p is not None and p[0] == t - 1 and len(succ[p]) == 1:
                tid = track_of[p]  # the same cell, next frame
                rows[tid][2] = t
            else:
                tid, next_id = next_id, next_id + 1
                rows[tid] = [tid, t, t, track_of[p] if p is not None else 0]
            track_of[node] = tid
            new[k] = tid
        luts.append((ids, new))
    out_dtype = np.uint16 if next_id <= np.iinfo(np.uint16).max else np.uint32
    out = np.zeros(labels.shape, out_dtype)
    for t, (ids, new) in enumerate(luts):
        if ids.size:
            frame = labels[t]
            idx = np.searchsorted(ids, frame)
            fg = frame > 0
            out[t][fg] = new[idx[fg]]
    tracks = np.array([rows[k] for k in sorted(rows)], np.int64).reshape(-1, 4)
    return TrackingResult(out, tracks)


def lineage_summary(tracks: np.ndarray) -> dict:
    """Counts and per-lineage facts of a CTC table (the content of lineage.json)."""
    tracks = np.asarray(tracks, np.int64).reshape(-1, 4)
    children: dict[int, list[int]] = defaultdict(list)
    info = {int(l): (int(b), int(e), int(p)) for l, b, e, p in tracks}
    for l, (_, _, p) in info.items():
        if p:
            children[p].append(l)
    # One child = the same cell after a gap (CTC); two or more = a division.
    divisions = {p: sorted(c) for p, c in children.items() if len(c) >= 2}
    gap_ended = sorted(p for p, c in children.items() if len(c) == 1)
    roots = sorted(l for l, (_, _, p) in info.items() if p == 0 or p not in info)
    lineages = []
    for root in roots:
        members, generations, stack = [], 0, [(root, 1)]
        while stack:
            node, gen = stack.pop()
            members.append(node)
            generations = max(generations, gen)
            step = 1 if node in divisions else 0
            stack.extend((c, gen + step) for c in children.get(node, []))
        lineages.append({"root": root, "tracks": sorted(members), "generations": generations,
                         "divisions": sum(1 for m in members if m in divisions),
                         "first_frame": min(info[m][0] for m in members),
                         "last_frame": max(info[m][1] for m in members)})
    return {"tracks": len(info), "divisions": len(divisions), "roots": len(roots),
            "tracks_ended_by_gaps": gap_ended,
            "division_events": [{"parent": p, "daughters": d, "frame": info[d[0]][0]}
                                for p, d in sorted(divisions.items())],
            "lineages": lineages}


def summary_line(result: TrackingResult) -> str:
    """One line for the user: frames, tracks, divisions, lineages, gaps."""
    s = result.lineage()
    return (f"{result.labels.shape[0]} frames: {s['tracks']} tracks, {s['divisions']} divisions, "
            f"{s['roots']} lineages, {len(s['tracks_ended_by_gaps'])} gaps closed")


# -- laptrack linkers (for comparison; see docs/tracking.md) -------------------------------------

def _laptrack_overlap_links(labels: np.ndarray, min_iou: float, max_gap: int):
    from laptrack import OverLapTrack

    if not labels.any():
        return []
    iou = (1.0, 0.0, -1.0, 0.0, 0.0)  # distance = 1 - IoU
    cover = (1.0, 0.0, 0.0, 0.0, -1.0)  # distance = 1 - overlap / later cell's area
    lt = OverLapTrack(cutoff=1.0 - min_iou, metric_coefs=iou,
                      gap_closing_cutoff=(1.0 - min_iou) if max_gap else False,
                      gap_closing_metric_coefs=iou, gap_closing_max_frame_count=max_gap + 1,
                      splitting_cutoff=1.0 - DEFAULT_SPLIT_COVER, splitting_metric_coefs=cover,
                      merging_cutoff=False)
    track_df, split_df, _ = lt.predict_overlap_dataframe(labels.astype(np.int64))
    df = track_df.reset_index()
    edges, first, last = [], {}, {}
    for tid, g in df.sort_values("frame").groupby("track_id"):
        nodes = list(zip(g["frame"].astype(int), g["label"].astype(int)))
        edges += list(zip(nodes[:-1], nodes[1:]))
        first[tid], last[tid] = nodes[0], nodes[-1]
    if not split_df.empty:  # (an empty frame has no columns)
        for p, c in zip(split_df["parent_track_id"], split_df["child_track_id"]):
            edges.append((last[p], first[c]))
    return edges


def _laptrack_centroid_links(labels: np.ndarray, max_gap: int):
    from laptrack import LapTrack

    from ..io.ctc import tracks_rows

    cols = tracks_rows(labels, {})
    if not cols["t"].size:
        return []
    # Cells move less than their radius per frame (the same assumption as overlap linking).
    radius = float(np.median(np.sqrt(cols["area"] / np.pi)))
    cutoff = radius ** 2
    lt = LapTrack(cutoff=cutoff, gap_closing_cutoff=cutoff if max_gap else False,
                  gap_closing_max_frame_count=max_gap + 1, splitting_cutoff=cutoff,
                  merging_cutoff=False)
    coords, ids = [], []
    for t in range(labels.shape[0]):
        sel = cols["t"] == t
        coords.append(np.stack([cols["y"][sel], cols["x"][sel]], axis=1).reshape(-1, 2))
        ids.append(cols["track_id"][sel])
    tree = lt.predict(coords)
    return [((a[0], int(ids[a[0]][a[1]])), (b[0], int(ids[b[0]][b[1]])))
            for a, b in tree.edges()]
