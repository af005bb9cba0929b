"""The classical baseline segmentation: Otsu threshold + distance-transform watershed (scikit-image).

It is what a microscopist would try first for fluorescent nuclei, and the yardstick for
`cellsam-rt evaluate --baseline`. Parameters (fixed, not tuned on any evaluation image):

- smoothing: Gaussian, sigma = 1.0 px (in the image's own pixels)
- foreground: Otsu threshold of the smoothed image, holes filled
- seeds: `peak_local_max` of the Euclidean distance transform, min_distance = 5 px,
  exclude_border = False, one seed per connected plateau
- split: watershed of the negated distance transform from the seeds, inside the foreground
- cleanup: objects smaller than 25 px removed (the runtime's min_size), labels renumbered 1..K
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from cellsam_rt.stages.preprocess import ChannelSpec, format_channels

__all__ = ["BASELINE_PARAMS", "baseline_channel", "otsu_watershed"]

BASELINE_PARAMS = {"sigma": 1.0, "min_distance": 5, "min_size": 25}


def baseline_channel(image: np.ndarray, channels: ChannelSpec = None) -> np.ndarray:
    """The single plane the baseline segments: the whole-cell stain if given, else the only one."""
    # format_channels puts one channel in slot 2, (nuclear, whole-cell) in slots 1 and 2.
    return format_channels(image, channels)[:, :, 2]


def otsu_watershed(image: np.ndarray, channels: ChannelSpec = None, sigma: float = 1.0,
                   min_distance: int = 5, min_size: int = 25) -> np.ndarray:
    """Label image (int32) of the Otsu + distance-transform watershed baseline."""
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    plane = baseline_channel(image, channels).astype(np.float64)
    smooth = gaussian(plane, sigma=sigma, preserve_range=True) if sigma > 0 else plane
    if smooth.max() <= smooth.min():
        return np.zeros(plane.shape, np.int32)  # a constant image has no foreground
    fg = ndi.binary_fill_holes(smooth > threshold_otsu(smooth))
    dist = ndi.distance_transform_edt(fg)
    blobs, _ = ndi.label(fg)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=blobs, exclude_border=False)
    markers = np.zeros(plane.shape, np.int32)
    markers[tuple(peaks.T)] = 1
    # Plateaus give several adjacent peaks: one seed per connected group of peak pixels.
    markers, _ = ndi.label(ndi.binary_dilation(markers > 0, iterations=1) & fg)
    # Blobs without any peak (tiny or odd shapes) keep their own label.
    missing = np.setdiff1d(np.unique(blobs[fg]), np.unique(blobs[markers > 0]))
    if missing.size:
        extra = np.isin(blobs, missing)
        markers[extra] = (markers.max() + ndi.label(extra)[0])[extra]
    labels = watershed(-dist, markers, mask=fg).astype(np.int32)
    return _remove_small(labels, min_size)


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop labels under min_size pixels and renumber the rest 1..K."""
    areas = np.bincount(labels.ravel())
    keep = areas >= min_size
    keep[0] = False
    lut = np.zeros(len(areas), np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def describe(params: Optional[dict] = None) -> str:
    """One-line description of the baseline and its parameters (for reports)."""
    p = {**BASELINE_PARAMS, **(params or {})}
    return (f"Otsu + distance-transform watershed (gaussian sigma {p['sigma']} px, "
            f"peak_local_max min_distance {p['min_distance']} px, min size {p['min_size']} px)")
