"""Object scale: the diameter estimate, image rescaling and the native-scale tile layout.

A model that states its `object_diameter` (model-input pixels) segments best when the image's
objects come to that size. The image is rescaled by s = object_diameter / diameter and cut into
tiles of the model's input size at that scale (no resizing inside a tile), with an overlap that
holds the largest cells whole; each cell belongs to the tile whose core holds its box centre.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

#: the model was trained on objects from about 1/RESCALE_TOLERANCE to RESCALE_TOLERANCE times
#: its object diameter: inside that band an image is segmented at the scale it comes in
RESCALE_TOLERANCE = 1.4
#: tiles overlap by this many object diameters (cells up to this size stay whole in one tile)
OVERLAP_DIAMETERS = 2.0
#: fewest detections that make a diameter estimate
MIN_DETECTIONS = 3
#: a tile has signal where its intensity range (0.1 to 99.9 percentile) spans more than this many
#: noise standard deviations; pure noise spans about 6.6
SIGNAL_SIGMAS = 12.0

__all__ = ["RESCALE_TOLERANCE", "box_diameter", "within_tolerance", "rescale_image",
           "labels_to_shape", "TileLayout", "tile_layout", "tile_starts", "Background",
           "background", "has_signal", "probe_window"]


def box_diameter(boxes: np.ndarray, sy: float = 1.0, sx: float = 1.0) -> float:
    """Median object diameter sqrt(w * h) of xyxy boxes, their axes scaled by (sy, sx) first;
    NaN with fewer than MIN_DETECTIONS boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) < MIN_DETECTIONS:
        return float("nan")
    w = (boxes[:, 2] - boxes[:, 0]) * sx
    h = (boxes[:, 3] - boxes[:, 1]) * sy
    return float(np.median(np.sqrt(np.clip(w, 0, None) * np.clip(h, 0, None))))


def within_tolerance(ratio: float, tolerance: float = RESCALE_TOLERANCE) -> bool:
    """Whether a size ratio lies inside [1/tolerance, tolerance]."""
    return 1.0 / tolerance <= ratio <= tolerance


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """An HxW[xC] image resized by `scale` (area averaging down, bilinear up), float32.

    Channels-last, any number of channels (cv2 takes at most 4 at a time)."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    src = image.astype(np.float32, copy=False)
    if src.ndim == 2 or src.shape[2] <= 4:
        out = cv2.resize(src, (out_w, out_h), interpolation=interp)
        return out.reshape(out_h, out_w, *src.shape[2:])
    return np.stack([cv2.resize(src[..., c], (out_w, out_h), interpolation=interp)
                     for c in range(src.shape[2])], axis=-1)


def labels_to_shape(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label image to `shape` (pixel centres aligned)."""
    h, w = int(shape[0]), int(shape[1])
    lh, lw = labels.shape
    if (lh, lw) == (h, w):
        return labels
    rows = np.minimum(((np.arange(h) + 0.5) * lh / h).astype(np.int64), lh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * lw / w).astype(np.int64), lw - 1)
    return labels[rows[:, None], cols[None, :]]


def tile_starts(length: int, size: int, overlap: int) -> np.ndarray:
    """Tile start positions along an axis: tiles of `size` covering `length`, evenly spread, with
    neighbours overlapping by at least `overlap` (one tile at 0 when length <= size)."""
    if length <= size:
        return np.zeros(1, dtype=np.int64)
    overlap = min(max(int(overlap), 0), size - 1)
    n = math.ceil((length - overlap) / (size - overlap))
    return np.round(np.linspace(0, length - size, n)).astype(np.int64)


@dataclass(frozen=True)
class TileLayout:
    """Square tiles of side `size` over a (scaled) image of `shape`.

    The frame is the image padded (with zeros) to at least `size` along each axis; tile (i, j)
    covers frame[ys[i]:ys[i]+size, xs[j]:xs[j]+size] and owns the cells whose box centre lies in
    its core: rows y_cuts[i]:y_cuts[i+1], cols x_cuts[j]:x_cuts[j+1] (the cuts halve overlaps).
    """

    shape: tuple[int, int]
    size: int
    ys: np.ndarray
    xs: np.ndarray

    @property
    def frame(self) -> tuple[int, int]:
        """Height and width of the padded frame the tiles cover."""
        return max(self.shape[0], self.size), max(self.shape[1], self.size)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    @staticmethod
    def _cuts(starts: np.ndarray, size: int, length: int) -> np.ndarray:
        mids = (starts[1:] + starts[:-1] + size) / 2.0
        return np.concatenate([[-np.inf], mids, [np.inf]])

    def tiles(self) -> list[tuple[int, int, tuple[float, float, float, float]]]:
        """(y, x, core (y0, y1, x0, x1)) of every tile, row by row."""
        yc = self._cuts(self.ys, self.size, self.frame[0])
        xc = self._cuts(self.xs, self.size, self.frame[1])
        return [(int(y), int(x), (yc[i], yc[i + 1], xc[j], xc[j + 1]))
                for i, y in enumerate(self.ys) for j, x in enumerate(self.xs)]


def tile_layout(shape: Sequence[int], size: int, overlap: int) -> TileLayout:
    """The native-scale tile layout of a scaled image of `shape` for a model input of `size`."""
    h, w = int(shape[0]), int(shape[1])
    return TileLayout(shape=(h, w), size=int(size), ys=tile_starts(h, size, overlap),
                      xs=tile_starts(w, size, overlap))


def overlap_for(object_diameter: float) -> int:
    """Tile overlap in model pixels: OVERLAP_DIAMETERS object diameters, a multiple of 8."""
    return int(math.ceil(OVERLAP_DIAMETERS * object_diameter / 8.0) * 8)


@dataclass(frozen=True)
class Background:
    """An image's median (the level tiles are padded with) and pixel noise: the standard
    deviation of neighbouring-pixel differences / sqrt 2, robustly (1.4826 * MAD), which cell
    contrast and smooth shading hardly touch."""

    level: float
    noise: float


def _gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image.max(axis=2)


def background(image: np.ndarray, max_samples: int = 1 << 20) -> Background:
    """Background statistics of a channels-last image from a strided sample of its pixels."""
    gray = _gray(np.asarray(image))
    step = max(1, int(math.sqrt(gray.size / max_samples)))
    sample = gray[::step].astype(np.float64)
    level = float(np.median(sample[:, ::step]))
    diff = np.diff(sample, axis=1).ravel()  # neighbours along a row
    if diff.size == 0:  # a one-pixel-wide image: no neighbours to tell noise by
        return Background(level, 0.0)
    noise = float(1.4826 * np.median(np.abs(diff - np.median(diff))) / math.sqrt(2.0))
    return Background(level, noise)


def has_signal(tile: np.ndarray, bg: Background, sigmas: float = SIGNAL_SIGMAS) -> bool:
    """Whether a tile's intensities span more than `sigmas` noise standard deviations (cells
    bright or dark alike); a tile of background and noise alone does not."""
    gray = _gray(np.asarray(tile))[::2, ::2]
    lo, hi = np.percentile(gray, [0.1, 99.9])
    return bool(hi - lo > sigmas * max(bg.noise, 1e-12)) if bg.noise > 0 else bool(hi > lo)


def probe_window(image: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left of the size x size window (on a coarse grid) with the most signal: where a
    diameter estimate looks. The whole image when it is no larger."""
    gray = _gray(np.asarray(image))
    h, w = gray.shape
    if h <= size and w <= size:
        return 0, 0
    best, where = -1.0, (0, 0)
    for y in tile_starts(h, size, size // 2):
        for x in tile_starts(w, size, size // 2):
            win = gray[y:y + size:4, x:x + size:4]
            score = float(win.std())
            if score > best:
                best, where = score, (int(y), int(x))
    return where


def scale_for(object_diameter: Optional[float], diameter: Optional[float]) -> Optional[float]:
    """Image-to-model scale from the model's and the image's object diameter (None if unknown)."""
    if not object_diameter or not diameter or not math.isfinite(diameter) or diameter <= 0:
        return None
    return float(object_diameter) / float(diameter)
