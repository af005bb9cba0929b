"""Synthetic time-lapse movies with ground truth, for testing and benchmarking tracking.

Nuclei are ellipses (20-30 px across at the defaults, the scale the default 512-px model sees
well) that drift, deform a little, touch their neighbours and divide: a dividing cell ends and
two smaller daughters appear side by side along its long axis. One cell can be hidden for a
frame (a missed detection), which the ground truth records the Cell Tracking Challenge way: the
track ends before the gap and a new track, whose parent is the old one, starts after it.

`make_movie` returns the images (float32, blurred, noisy), the ground-truth label stack (each
pixel holds its track id) and the CTC lineage table (`L B E P` rows). `jitter_masks` and
`drop_detection` turn ground-truth masks into imperfect "detections" for linking tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi


@dataclass
class SyntheticMovie:
    """A generated movie: images, ground-truth labels (track ids) and the CTC lineage."""

    images: np.ndarray  # (T, Y, X) float32
    labels: np.ndarray  # (T, Y, X) uint16, pixel value = track id
    tracks: np.ndarray  # (N, 4) int64 rows L B E P (CTC res_track.txt / man_track.txt)
    divisions: list[tuple[int, int, int]] = field(default_factory=list)  # (parent, d1, d2)

    @property
    def parents(self) -> dict[int, int]:
        return {int(l): int(p) for l, _, _, p in self.tracks}


@dataclass
class _Cell:
    track: int
    y: float
    x: float
    a: float  # semi-axes (px) and orientation (radians)
    b: float
    theta: float
    vy: float
    vx: float
    brightness: float
    a0: float = 0.0  # adult size: daughters grow back towards it
    b0: float = 0.0


def _ellipse(shape, c: _Cell) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (rows, cols) inside the cell's ellipse."""
    r = int(np.ceil(max(c.a, c.b))) + 1
    y0, y1 = max(int(c.y) - r, 0), min(int(c.y) + r + 2, shape[0])
    x0, x1 = max(int(c.x) - r, 0), min(int(c.x) + r + 2, shape[1])
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - c.y, xx - c.x
    cos, sin = np.cos(c.theta), np.sin(c.theta)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    inside = (u / c.a) ** 2 + (v / c.b) ** 2 <= 1.0
    return yy[inside], xx[inside]


def _radius(c: _Cell) -> float:
    return float(np.sqrt(c.a * c.b))


def _place(rng, shape, n, radius, margin) -> list[tuple[float, float, float]]:
    """Centres and radii by rejection sampling; neighbours may touch (0.9 x the sum of radii)."""
    ys, xs, rs = np.zeros(n), np.zeros(n), np.zeros(n)
    k = 0
    for _ in range(n * 200):
        if k == n:
            break
        r = rng.uniform(*radius)
        y = rng.uniform(margin + r, shape[0] - margin - r)
        x = rng.uniform(margin + r, shape[1] - margin - r)
        if np.all(np.hypot(ys[:k] - y, xs[:k] - x) >= 0.9 * (rs[:k] + r)):
            ys[k], xs[k], rs[k] = y, x, r
            k += 1
    return list(zip(ys[:k].tolist(), xs[:k].tolist(), rs[:k].tolist()))


def make_movie(n_frames: int = 12, shape: tuple[int, int] = (256, 256), n_cells: int = 10,
               divisions: int = 2, missing: bool = True, radius: tuple[float, float] = (10, 14),
               speed: float = 1.5, seed: int = 0, render: bool = True) -> SyntheticMovie:
    """Generate a movie with `divisions` cell divisions and, with `missing`, one hidden cell.

    `radius` is the range of nuclear radii (px), `speed` the typical drift per frame (px).
    With `render=False` only the labels and lineage are made (images stay zero), which is
    faster for large linking benchmarks.
    """
    rng = np.random.default_rng(seed)
    H, W = shape
    cells = []
    for i, (y, x, r) in enumerate(_place(rng, shape, n_cells, radius, margin=4), start=1):
        e = rng.uniform(1.1, 1.35)  # elongation; a * b = r^2 keeps the area
        cells.append(_Cell(i, y, x, r * np.sqrt(e), r / np.sqrt(e), rng.uniform(0, np.pi),
                           *rng.normal(0, speed / np.sqrt(2), 2), rng.uniform(0.55, 1.0)))
        cells[-1].a0, cells[-1].b0 = cells[-1].a, cells[-1].b
    next_id = len(cells) + 1
    # Division frames: away from the ends so both parent and daughters live >= 2 frames.
    div_at: dict[int, int] = {}
    if n_frames >= 5 and cells:
        for c in rng.choice(cells, size=min(divisions, len(cells)), replace=False):
            div_at[c.track] = int(rng.integers(2, n_frames - 2))
    hide = None
    if missing and n_frames >= 5 and cells:
        undivided = [c.track for c in cells if c.track not in div_at] or [cells[0].track]
        hide = (int(rng.integers(2, n_frames - 2)), int(rng.choice(undivided)))

    labels = np.zeros((n_frames, H, W), np.uint16)
    images = np.zeros((n_frames, H, W), np.float32)
    spans: dict[int, list[int]] = {}  # track -> [first, last]
    parents: dict[int, int] = {c.track: 0 for c in cells}
    div_list: list[tuple[int, int, int]] = []
    for t in range(n_frames):
        if t > 0:
            cells = _step(rng, cells, shape, speed)
        born = []
        for c in cells:
            if div_at.get(c.track) == t:
                d1, d2 = _divide(rng, c, next_id)
                next_id += 2
                parents[d1.track] = parents[d2.track] = c.track
                div_list.append((c.track, d1.track, d2.track))
                born += [d1, d2]
            else:
                born.append(c)
        cells = born
        intensity = np.zeros((H, W), np.float32)
        for c in sorted(cells, key=lambda c: c.track):
            if hide == (t, c.track):
                continue
            rr, cc = _ellipse(shape, c)
            labels[t, rr, cc] = c.track
            intensity[rr, cc] = c.brightness
            span = spans.setdefault(c.track, [t, t])
            span[1] = t
        if render:
            images[t] = _render(rng, labels[t], intensity)
    tracks = np.array([[l, b, e, parents[l]] for l, (b, e) in sorted(spans.items())],
                      np.int64).reshape(-1, 4)
    # Dropped parents (a track that never showed) cannot be referenced.
    known = set(tracks[:, 0].tolist())
    tracks[~np.isin(tracks[:, 3], list(known)), 3] = 0
    if hide is not None:
        labels, tracks = split_gaps(labels, tracks)
    return SyntheticMovie(images, labels, tracks, div_list)


def _step(rng, cells: list[_Cell], shape, speed: float) -> list[_Cell]:
    """Drift (a persistent random walk), deform a little, grow daughters, avoid crowding."""
    H, W = shape
    ys = np.array([c.y for c in cells])
    xs = np.array([c.x for c in cells])
    rs = np.array([_radius(c) for c in cells])
    for i, c in enumerate(cells):
        c.vy = 0.7 * c.vy + rng.normal(0, 0.5 * speed)
        c.vx = 0.7 * c.vx + rng.normal(0, 0.5 * speed)
        ny, nx = c.y + c.vy, c.x + c.vx
        r = rs[i]
        blocked = not (r + 2 <= ny <= H - r - 2 and r + 2 <= nx <= W - r - 2)
        if not blocked:
            d_new = np.hypot(ys - ny, xs - nx)
            d_old = np.hypot(ys - c.y, xs - c.x)
            # Moving apart is always allowed (daughters start closer than the limit).
            crowd = (d_new < 0.85 * (r + rs)) & (d_new < d_old)
            crowd[i] = False
            blocked = bool(crowd.any())
        if blocked:
            c.vy, c.vx = -c.vy, -c.vx
        else:
            c.y, c.x = ny, nx
            ys[i], xs[i] = ny, nx
        grow = 1.0 + 0.04 * (c.a < c.a0)
        c.a = float(np.clip(c.a * grow * rng.normal(1, 0.02), 0.5 * c.a0, 1.1 * c.a0))
        c.b = float(np.clip(c.b * grow * rng.normal(1, 0.02), 0.5 * c.b0, 1.1 * c.b0))
        c.theta += rng.normal(0, 0.08)
    return cells


def _divide(rng, c: _Cell, first_id: int) -> tuple[_Cell, _Cell]:
    """Two daughters side by side along the mother's long axis, moving apart."""
    u = np.array([np.sin(c.theta), np.cos(c.theta)])  # (dy, dx) of the long axis
    off = 0.55 * c.a
    out = []
    for k, s in enumerate((-1.0, 1.0)):
        d = _Cell(first_id + k, c.y + s * off * u[0], c.x + s * off * u[1], 0.62 * c.a,
                  0.85 * c.b, c.theta + np.pi / 2 + rng.normal(0, 0.1), s * u[0], s * u[1],
                  float(np.clip(c.brightness * rng.normal(1, 0.05), 0.4, 1.0)), c.a0, c.b0)
        # The daughter's long axis is across the mother's: swap axes to keep a >= b.
        d.a, d.b = max(d.a, d.b), min(d.a, d.b)
        out.append(d)
    return out[0], out[1]


def _render(rng, labels: np.ndarray, intensity: np.ndarray) -> np.ndarray:
    """Fluorescence-like image: textured nuclei, darker rims where nuclei touch, blur, noise."""
    texture = ndi.gaussian_filter(rng.normal(0, 1, labels.shape), 2.0).astype(np.float32)
    img = intensity * (1.0 + 0.15 * texture / (texture.std() + 1e-6))
    edge = (ndi.grey_dilation(labels, size=3) != ndi.grey_erosion(labels, size=3)) & (labels > 0)
    img[edge] *= 0.55
    img = ndi.gaussian_filter(img, 1.2) + 0.05
    img += rng.normal(0, 0.02, labels.shape).astype(np.float32)
    return np.clip(img, 0, None).astype(np.float32)


# -- ground-truth bookkeeping ---------------------------------------------------------------------

def split_gaps(labels: np.ndarray, tracks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give each frame-gapped track a new id after each gap, the piece before as parent (CTC)."""
    labels = labels.copy()
    present = [set(np.unique(f).tolist()) - {0} for f in labels]
    parents = {int(l): int(p) for l, _, _, p in tracks}
    next_id = max(parents, default=0) + 1
    rows: list[list[int]] = []
    last_piece: dict[int, int] = {}
    for lab in sorted(parents):
        frames = [t for t, s in enumerate(present) if lab in s]
        if not frames:
            continue
        cur, start, parent = lab, frames[0], parents[lab]
        for prev, t in zip(frames, frames[1:]):
            if t != prev + 1:
                rows.append([cur, start, prev, parent])
                parent, cur, start = cur, next_id, t
                next_id += 1
            if cur != lab:
                labels[t][labels[t] == lab] = cur
        rows.append([cur, start, frames[-1], parent])
        last_piece[lab] = cur
    # A child starts after its parent's last frame: it descends from the parent's last piece.
    for r in rows:
        if r[3] in parents and r[3] in last_piece and r[0] in parents:
            r[3] = last_piece[r[3]]
    return labels, np.array(sorted(rows), np.int64).reshape(-1, 4)


def jitter_masks(labels: np.ndarray, seed: int = 0, fraction: float = 0.5) -> np.ndarray:
    """Boundary noise: a random `fraction` of masks per frame grows or shrinks by one pixel."""
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(seed)
    out = labels.copy()
    for t, frame in enumerate(labels):
        ids = np.unique(frame)
        ids = ids[ids > 0]
        if not ids.size:
            continue
        pick = ids[rng.random(ids.size) < fraction]
        grow = pick[rng.random(pick.size) < 0.5]
        shrink = np.setdiff1d(pick, grow)
        grown = expand_labels(frame, 1)
        add = (frame == 0) & np.isin(grown, grow)
        rim = (ndi.grey_erosion(frame, size=3) != frame) & np.isin(frame, shrink)
        result = frame.copy()
        result[add] = grown[add]
        result[rim] = 0
        out[t] = result
    return out


def drop_detection(labels: np.ndarray, frame: int, label: int | None = None,
                   seed: int = 0) -> tuple[np.ndarray, int]:
    """Remove one cell (`label`, or a random mid-track one) from a frame; returns (labels, label)."""
    out = labels.copy()
    ids = np.unique(out[frame])
    ids = ids[ids > 0]
    if label is None:
        # A cell seen in the frames around, so the gap is in the middle of its track.
        for near in (frame - 1, frame + 1):
            if 0 <= near < len(labels):
                ids = np.intersect1d(ids, labels[near])
        if not ids.size:
            raise ValueError(f"frame {frame} has no cells to drop")
        label = int(np.random.default_rng(seed).choice(ids))
    out[frame][out[frame] == label] = 0
    return out, int(label)
