"""Masks read against the image: each edge moved to a fixed fraction of the object's own
contrast, and objects too faint to be cells dropped.

The mask decoder draws outlines at half the model input's resolution, at a depth of the blurred
edge that differs from image to image. `refine_outlines` redraws each mask's edge in the image
itself: within `band` pixels of the decoder's outline, a pixel belongs to the object when its
(lightly smoothed) intensity lies above `fraction` of the way from the object's surround to its
interior. The core of each mask is kept, so an object never breaks up or vanishes; a mask that
would change its area by more than `AREA_RANGE` allows (a dim object in haze, a merged pair) is
left as decoded. A mask whose interior stands above its surround by less than `FAINT` of the
image's median object contrast (cytoplasmic haze, out-of-focus nuclei) is removed. Only
single-channel images with objects brighter than their background (after polarity) are read: a
whole-cell mask has no single stain to read its edge from.

`contrast_outlines` is the whole stage (outline mode "contrast"): the edges redrawn, each mask
kept as one piece, and fragments dropped in every image (masks far from convex, what a
neighbour's overlapping mask left of one, and specks far smaller than the image's other masks:
`postprocess.drop_fragments`).
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
from scipy import ndimage

from cellsam_rt.stages.postprocess import drop_fragments, largest_parts

__all__ = ["FRACTION", "BAND", "SIGMA", "MIN_AREA", "AREA_RANGE", "FAINT", "refine_outlines",
           "contrast_outlines"]

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
#: objects with less than this share of the image's median object contrast are removed
FAINT = 0.1

_CROSS = np.ones((3, 3), np.uint8)
_RING = 3  # surround: RING pixels just outside the band, other objects excluded


def _grown(mask: np.ndarray, steps: int) -> np.ndarray:
    return cv2.dilate(mask, _CROSS, iterations=steps).astype(bool)


def _shrunk(mask: np.ndarray, steps: int) -> np.ndarray:
    return cv2.erode(mask, _CROSS, iterations=steps, borderType=cv2.BORDER_REPLICATE).astype(bool)


def _contrast(plane: np.ndarray, crop: np.ndarray, mine: np.ndarray, band: int
              ) -> Optional[tuple[float, float]]:
    """(interior, surround) medians of the mask `mine` in a crop of the labels, or None with
    no surround."""
    m8 = mine.view(np.uint8)
    interior = _shrunk(m8, 2)
    if interior.sum() < 4:
        interior = mine
    ring = _grown(m8, band + _RING) & ~_grown(m8, band) & (crop == 0)
    if ring.sum() < 4:
        return None  # packed among other objects: no surround to read
    return float(np.median(plane[interior])), float(np.median(plane[ring]))


def _redrawn(plane: np.ndarray, crop: np.ndarray, mine: np.ndarray, level: float, band: int
             ) -> Optional[np.ndarray]:
    """The mask `mine` in a crop of the labels with its edge at `level`, or None to keep it."""
    m8 = mine.view(np.uint8)
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
                    band: int = BAND, sigma: float = SIGMA, min_area: int = MIN_AREA,
                    faint: Optional[float] = FAINT) -> np.ndarray:
    """A copy of `labels` (2-D) with each mask's edge redrawn in `plane` (the single-channel
    image, objects bright, same height and width) and faint objects removed (none with
    `faint=None`: masks from the user's boxes); the other label values are kept."""
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
    measured = []  # (value, crop slices, its mask there, interior, surround)
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        crop = (slice(max(box[0].start - pad, 0), min(box[0].stop + pad, h)),
                slice(max(box[1].start - pad, 0), min(box[1].stop + pad, w)))
        # Decoded labels: every object reads the same surround, whatever was redrawn before it.
        mine = labels[crop] == value
        m = _contrast(smooth[crop], labels[crop], mine, band)
        if m is not None:
            measured.append((value, crop, mine, *m))
    if not measured:
        return out
    typical = float(np.median([inside - outside for *_, inside, outside in measured]))
    for value, crop, mine, inside, outside in measured:
        target = out[crop]
        if faint is not None and typical > 0 and inside - outside < faint * typical:
            target[target == value] = 0
            continue
        if inside <= outside or np.count_nonzero(mine) < min_area:
            continue
        new = _redrawn(smooth[crop], labels[crop], mine, outside + fraction * (inside - outside),
                       band)
        if new is None:
            continue
        target[(target == value) & ~new] = 0
        target[new & (target == 0)] = value  # grown pixels: the first object to reach one keeps it
    return out


def contrast_outlines(labels: np.ndarray, plane: Optional[np.ndarray], prompted: bool
                      ) -> np.ndarray:
    """The outline stage on a 2-D label image: edges redrawn in `plane` (None: several channels,
    left as decoded), one piece per mask, faint masks and fragments dropped unless the masks come
    from the user's boxes (`prompted`: each a cell to keep)."""
    if plane is not None:
        labels = refine_outlines(labels, plane, faint=None if prompted else FAINT)
    labels = largest_parts(labels)  # no label vanishes
    return labels if prompted else drop_fragments(labels)
