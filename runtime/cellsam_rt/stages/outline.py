"""Outline refinement: each mask's edge moved to a fixed fraction of its own contrast.

The mask decoder draws outlines at half the model input's resolution, at a depth of the blurred
edge that differs from image to image. `refine_outlines` redraws each mask's edge in the image
itself: within `band` pixels of the decoder's outline, a pixel belongs to the object when its
(lightly smoothed) intensity lies above `fraction` of the way from the object's surround to its
interior. The core of each mask is kept, so an object never breaks up or vanishes; a mask that
would change its area by more than `AREA_RANGE` allows (a dim object in haze, a merged pair) is
left as decoded. Only single-channel images with objects brighter than their background (after
polarity) are refined: a whole-cell mask has no single stain to read its edge from.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
from scipy import ndimage

__all__ = ["FRACTION", "BAND", "SIGMA", "MIN_AREA", "AREA_RANGE", "refine_outlines"]

#: where between surround (0) and interior (1) the edge is drawn
FRACTION = 0.4
#: how far (pixels) the edge may move in or out of the decoder's outline
BAND = 2
#: Gaussian smoothing (pixels) of the image before the edge is read: camera noise off the edge
SIGMA = 1.0
#: masks smaller than this (pixels) are left as decoded: the band would be most of them
MIN_AREA = 100
#: a refined mask whose area ratio to the decoded one falls outside this range is not used
AREA_RANGE = (0.7, 1.5)

_CROSS = np.ones((3, 3), np.uint8)
_RING = 3  # surround: RING pixels just outside the band, other objects excluded


def _grown(mask: np.ndarray, steps: int) -> np.ndarray:
    return cv2.dilate(mask, _CROSS, iterations=steps).astype(bool)


def _shrunk(mask: np.ndarray, steps: int) -> np.ndarray:
    return cv2.erode(mask, _CROSS, iterations=steps, borderType=cv2.BORDER_REPLICATE).astype(bool)


def _refined(plane: np.ndarray, crop: np.ndarray, value: int, fraction: float,
             band: int) -> Optional[np.ndarray]:
    """The refined mask of label `value` in a crop, or None to keep the decoded one."""
    mine = crop == value
    m8 = mine.view(np.uint8)
    interior = _shrunk(m8, 2)
    if interior.sum() < 4:
        interior = mine
    ring = _grown(m8, band + _RING) & ~_grown(m8, band) & (crop == 0)
    if ring.sum() < 4:
        return None  # packed among other objects: no surround to read
    inside = float(np.median(plane[interior]))
    outside = float(np.median(plane[ring]))
    if inside <= outside:
        return None
    level = outside + fraction * (inside - outside)
    reach = _grown(m8, band) & ((crop == 0) | mine)
    new = (reach & (plane > level)) | _shrunk(m8, band)
    n, comp = cv2.connectedComponents(new.view(np.uint8), connectivity=8)
    if n > 2:  # keep the part that holds most of the decoded mask
        counts = np.bincount(comp[mine], minlength=n)
        counts[0] = 0
        new = comp == int(counts.argmax())
    new = ndimage.binary_fill_holes(new)
    lo, hi = AREA_RANGE
    return new if lo <= new.sum() / mine.sum() <= hi else None


def refine_outlines(labels: np.ndarray, plane: np.ndarray, fraction: float = FRACTION,
                    band: int = BAND, sigma: float = SIGMA, min_area: int = MIN_AREA
                    ) -> np.ndarray:
    """A copy of `labels` (2-D) with each mask's edge redrawn in `plane` (the single-channel
    image, objects bright, same height and width); label values are kept."""
    labels = np.asarray(labels)
    plane = np.asarray(plane)
    if labels.ndim != 2 or plane.shape != labels.shape:
        raise ValueError(f"refine_outlines needs a 2-D label image and a plane of the same shape, "
                         f"got {labels.shape} and {plane.shape}")
    out = labels.copy()
    if not labels.any():
        return out
    smooth = plane.astype(np.float32)
    if sigma > 0:
        smooth = cv2.GaussianBlur(smooth, (0, 0), sigma)
    h, w = labels.shape
    pad = _RING + band + 1
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        y0, y1 = max(box[0].start - pad, 0), min(box[0].stop + pad, h)
        x0, x1 = max(box[1].start - pad, 0), min(box[1].stop + pad, w)
        crop = labels[y0:y1, x0:x1]  # decoded labels: every object reads the same surround
        if np.count_nonzero(crop == value) < min_area:
            continue
        new = _refined(smooth[y0:y1, x0:x1], crop, value, fraction, band)
        if new is None:
            continue
        target = out[y0:y1, x0:x1]
        target[(target == value) & ~new] = 0
        target[new & (target == 0)] = value  # grown pixels: the first object to reach one keeps it
    return out
