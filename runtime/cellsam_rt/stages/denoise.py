"""Camera noise smoothed away before the model reads a very noisy image.

The detector misses most nuclei of an image whose intensity span is only a few noise standard
deviations (dim, short exposures, high gain): the noise reads as texture at the scale of the
objects. `denoised` measures the image's span (1st to 99th percentile) in units of its pixel
noise (`stages.scale.background`, from neighbouring-pixel differences) and, where that ratio
is below `TARGET_SPAN`, smooths the image with a Gaussian wide enough to bring white noise down
to that ratio: a Gaussian of sigma s lowers white noise by 1 / (2 s sqrt(pi)). Images with less
noise than that are left as they are, so clean images keep every edge.
"""
from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np

from cellsam_rt.stages.preprocess import channel_axis
from cellsam_rt.stages.scale import background

__all__ = ["TARGET_SPAN", "MIN_SIGMA", "MAX_SIGMA", "noise_sigma", "denoised"]

#: the intensity span, in noise standard deviations, smoothing brings a noisy image up to
TARGET_SPAN = 30.0
#: smoothing narrower than this (pixels) changes nothing the model sees: not applied
MIN_SIGMA = 0.3
#: never wider than this (pixels): beyond it smoothing erases small nuclei with the noise
MAX_SIGMA = 3.0


def _span(gray: np.ndarray, max_samples: int = 1 << 20) -> float:
    step = max(1, int(math.sqrt(gray.size / max_samples)))
    lo, hi = np.percentile(gray[::step, ::step], [1, 99])
    return float(hi - lo)


def noise_sigma(image: np.ndarray, target: float = TARGET_SPAN) -> float:
    """The Gaussian sigma (pixels) that brings a channels-last image's intensity span up to
    `target` noise standard deviations; 0 where the image is that clean already (or flat)."""
    image = np.asarray(image)
    gray = image if image.ndim == 2 else image.max(axis=2)
    noise = background(image).noise
    span = _span(gray)
    if noise <= 0 or span <= 0:
        return 0.0
    sigma = target / (span / noise) / (2.0 * math.sqrt(math.pi))
    return 0.0 if sigma < MIN_SIGMA else min(sigma, MAX_SIGMA)


def denoised(image: np.ndarray, target: float = TARGET_SPAN) -> Optional[np.ndarray]:
    """A smoothed float32 copy of a 2-D or 3-D image (in its own axis order) whose noise the
    model would read as texture, or None where it needs none."""
    a = np.asarray(image)
    axis = channel_axis(a)  # moved back after smoothing
    last = a if axis is None else np.moveaxis(a, axis, -1)
    sigma = noise_sigma(last, target)
    if sigma == 0.0:
        return None
    src = last.astype(np.float32)
    if src.ndim == 2 or src.shape[2] <= 4:
        out = cv2.GaussianBlur(src, (0, 0), sigma).reshape(src.shape)
    else:
        out = np.stack([cv2.GaussianBlur(src[..., c], (0, 0), sigma)
                        for c in range(src.shape[2])], axis=-1)
    return out if axis is None else np.moveaxis(out, -1, axis)
