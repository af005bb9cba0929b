"""Object polarity: dark objects on a bright background (brightfield-like, phase, inverted
stains) are inverted before the model sees them, since CellSAM-family models are trained on
bright objects on a dark background (fluorescence).

`polarity="auto"` decides per image in two steps. A cheap gate: a fluorescence image has a
long bright tail (its objects) above a dark background, so its intensities are skewed to the
right; dark objects on a bright background skew them to the left. Only an image whose skewness
(of the intensities clipped to their [0.5, 99.5] percentile span) is below `SKEW_GATE` is looked
at further, so a fluorescence image costs no model call. The detector then decides: the image is
inverted when the detector is surer (by `MARGIN`) of the objects it finds in the inverted image
than in the image as given (the scale search's confidence, best over two scales); on a tie the
image is kept. Only single-channel images are checked; "dark" inverts any image.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from cellsam_rt.pipeline.native import detect_diameter

__all__ = ["SKEW_GATE", "MARGIN", "single_plane", "skewness", "inverted", "probe_scales", "orient"]

#: skewness below which the detector is asked (fluorescence images lie well above it)
SKEW_GATE = 0.25
#: how much surer the detector must be of the inverted image to invert it
MARGIN = 1.05


def single_plane(image: np.ndarray) -> Optional[np.ndarray]:
    """The image as one 2-D plane, or None when it has several channels."""
    a = np.asarray(image)
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:2])
    return a if a.ndim == 2 else None


def skewness(plane: np.ndarray, max_samples: int = 1 << 20) -> float:
    """Skewness of a strided pixel sample clipped to its [0.5, 99.5] percentile span (clipping
    keeps a few hot or dead pixels from setting it); 0 for a flat image."""
    step = max(1, int(math.sqrt(plane.size / max_samples)))
    sample = plane[::step, ::step].astype(np.float64)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        return 0.0
    u = np.clip(sample, lo, hi)
    d = u - u.mean()
    sd = float(np.sqrt(np.mean(d * d)))
    return float(np.mean(d ** 3) / sd ** 3) if sd > 0 else 0.0


def inverted(image: np.ndarray) -> np.ndarray:
    """max - image (min + max - image for signed and float data), in the image's dtype."""
    a = np.asarray(image)
    if a.dtype.kind == "b":
        return ~a
    if a.dtype.kind == "u":
        return (a.max() - a).astype(a.dtype)
    return (a.max() + a.min() - a).astype(a.dtype)


def probe_scales(seg, shape) -> list[float]:
    """Scales to read the image at: the given diameter's, else the whole image in the model
    input and, for a model that states its object diameter, the image's own scale (where a
    large image's small objects are seen)."""
    whole = seg.size / max(shape[0], shape[1])
    if seg.object_diameter is None:
        return [whole]
    if seg.box_diameter is not None:
        return [seg.object_diameter / seg.box_diameter]
    return sorted({whole, 1.0})


def orient(seg, image: np.ndarray, channels=None) -> Optional[np.ndarray]:
    """The image the model should see when it is not `image` itself (its inversion), else None.
    `seg` is a Segmenter (its polarity, detector, sizes)."""
    if seg.polarity == "bright":
        return None
    if seg.polarity == "dark":
        return inverted(image)
    plane = single_plane(image)
    if plane is None or skewness(plane) >= SKEW_GATE:
        return None
    flipped = inverted(plane)
    scales = probe_scales(seg, plane.shape)
    as_given = max(detect_diameter(seg, plane, None, s)[1] for s in scales)
    as_flipped = max(detect_diameter(seg, flipped, None, s)[1] for s in scales)
    return inverted(image) if as_flipped > MARGIN * as_given else None
