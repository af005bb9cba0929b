"""Whether the model reads a very noisy image smoothed (`stages.denoise`) or as given: the
detector decides.

Smoothing helps where the model takes camera noise for texture and misses the nuclei under it,
but smoothed noise on a wide empty background becomes blobs the size of small nuclei. So, as the
polarity check does, the detector probes both views (at the scales the polarity check reads,
`polarity.probe_scales`) and the smoothed one is taken only when its detections are surer on
average (mean detection score, best over the scales; a view with more detections is not surer
for that). Clean images cost nothing: `denoised` leaves them as they are before any model call.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from cellsam_rt.pipeline.native import probe_detections
from cellsam_rt.pipeline.polarity import inverted, orient, probe_scales, single_plane
from cellsam_rt.stages.denoise import denoised
from cellsam_rt.stages.preprocess import channels_last

__all__ = ["mean_score", "clearer", "model_view"]


def mean_score(seg, image: np.ndarray, channels, scales) -> float:
    """The detector's mean detection score on `image` (2-D or channels-last), best over
    `scales` (0: none found)."""
    best = 0.0
    for s in scales:
        scores = probe_detections(seg, image, channels, s).scores
        if len(scores):
            best = max(best, float(np.mean(scores)))
    return best


def clearer(seg, smoothed: np.ndarray, given: np.ndarray, channels, scales) -> bool:
    """Whether the detector is surer of the objects in `smoothed` than in `given` (ties: no)."""
    return mean_score(seg, smoothed, channels, scales) > mean_score(seg, given, channels, scales)


def model_view(seg, image: np.ndarray, channels=None) -> Optional[np.ndarray]:
    """What the model reads in place of `image`, or None: the image itself. A single-channel
    image is smoothed where very noisy (`seg.denoise` "gaussian") and the detector reads it
    better so, then inverted where its objects are dark (`polarity.orient`)."""
    # Single-channel images only: a whole-cell stain's faint membranes are its edges.
    smooth = (denoised(image) if seg.denoise == "gaussian" and single_plane(image) is not None
              else None)
    flipped = orient(seg, image if smooth is None else smooth, channels)
    if smooth is None:
        return flipped
    # Both views as oriented; the smoothed one where the detector reads it better.
    given = image if flipped is None else inverted(image)
    read = smooth if flipped is None else flipped
    scales = probe_scales(seg, channels_last(image).shape)
    if clearer(seg, channels_last(read), channels_last(given), channels, scales):
        return read
    return None if flipped is None else given
