"""Image preprocessing of the reference CellSAM pipeline (docs/design.md §2.1-2.5), in numpy.

Every step reproduces the reference's arithmetic (dtypes and order of operations included) so that
the graphs see the same inputs the PyTorch reference feeds its modules. The model input size S is
a parameter throughout (1024 for CellSAM, smaller for test models).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from skimage.exposure import equalize_adapthist, rescale_intensity

ChannelSpec = Union[None, int, Sequence[Optional[int]]]

# docs/design.md §2.2: clip percentile of the non-zero values and the CLAHE kernel.
NORMALIZE_PERCENTILE = 99.9
CLAHE_KERNEL_SIZE = 128
# docs/design.md §2.4: the SAM branch rescales between the smallest non-zero value and this
# percentile.
SAM_PERCENTILE = 99.5
# ImageNet statistics (torchvision Normalize, applied in float32).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# SAM's pixel statistics, stored as float32 buffers in the reference model.
SAM_PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
SAM_PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
# kornia.enhance.normalize_min_max's default eps.
MINMAX_EPS = np.float32(1e-6)


def _check_pixels(image: np.ndarray) -> None:
    """Raise ValueError for arrays no microscope image can be (with the reason)."""
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    kind = image.dtype.kind
    if kind == "b":
        raise ValueError("image is boolean; pass intensities (integer or float), not a mask")
    if kind == "c":
        raise ValueError("image is complex-valued; pass real intensities")
    if kind not in "iuf":
        raise ValueError(f"image has unsupported dtype {image.dtype}; expected integer or float")
    if kind == "f" and not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")


def _select_channels(num_channels: int, channels: ChannelSpec) -> list:
    """Channel indices to keep, in slot order (nuclear before whole-cell)."""
    if channels is None:
        if num_channels > 3:
            raise ValueError(
                f"image has {num_channels} channels; CellSAM takes at most 3. Select the "
                "nuclear and whole-cell channels explicitly (channels=(nuclear, wholecell); "
                "on the command line --channels N,W). A stack of planes rather than channels: "
                "name its axes (--axes ZYX) and pick a plane (--plane Z=I).")
        return list(range(num_channels))
    if isinstance(channels, (int, np.integer)):
        requested = [int(channels)]
    else:
        requested = [None if c is None else int(c) for c in channels]
        if len(requested) not in (1, 2):
            raise ValueError(f"channels must be (nuclear, wholecell); got {channels!r}")
    picked = []
    for c in requested:
        if c is None:
            continue
        if not -num_channels <= c < num_channels:
            raise ValueError(f"channel index {c} out of range for an image with "
                             f"{num_channels} channel(s)")
        picked.append(c % num_channels)
    if not picked:
        raise ValueError("channels selects no channel")
    return picked


def channel_axis(image: np.ndarray) -> Optional[int]:
    """The channel axis of the user's image: like the reference, a 3-D image's smallest axis (the
    first one on ties); None for a 2-D image."""
    shape = np.shape(image)
    return int(np.argmin(shape)) if len(shape) == 3 else None


def channels_last(image: np.ndarray) -> np.ndarray:
    """The user's image as HxW or HxWxC (`channel_axis` moved last)."""
    image = np.asarray(image)
    axis = channel_axis(image)
    return image if axis is None else np.moveaxis(image, axis, -1)


def format_channels(image: np.ndarray, channels: ChannelSpec = None) -> np.ndarray:
    """Put a 2-D or 3-D image into the reference's zero HxWx3 float64 layout, channels last-aligned."""
    image = np.asarray(image)
    _check_pixels(image)
    if image.ndim == 2:
        image = image[..., None]
    elif image.ndim == 3:
        image = channels_last(image)
    else:
        raise ValueError(f"image must be 2-D (H, W) or 3-D (H, W, C); got shape {image.shape}")
    if channels is None and 1 < image.shape[-1] <= 3 and all(
            np.array_equal(image[..., 0], image[..., c]) for c in range(1, image.shape[-1])):
        # Grey saved as RGB: one channel, as the plain grey image (three equal channels would
        # fill the blank and whole-cell slots with the nuclear signal, a layout never trained).
        image = image[..., :1]
    picked = _select_channels(image.shape[-1], channels)
    h, w = image.shape[:2]
    out = np.zeros((h, w, 3), dtype=np.float64)
    # One channel -> slot 2; nuclear + whole-cell -> slots 1, 2 (docs/design.md §2.1).
    out[:, :, 3 - len(picked):] = image[:, :, picked]
    return out


def normalize_channels(img3: np.ndarray) -> np.ndarray:
    """Per-channel 99.9th-percentile clip, [0,1] rescale and CLAHE, as the reference normalises."""
    img3 = np.asarray(img3, dtype=np.float64)
    if img3.ndim != 3 or img3.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img3.shape}")
    out = np.zeros_like(img3)
    for c in range(3):
        chan = img3[:, :, c].copy()
        nonzero = chan[chan != 0]
        if nonzero.size == 0:
            continue  # blank channel stays 0
        np.minimum(chan, np.percentile(nonzero, NORMALIZE_PERCENTILE), out=chan)
        if (chan == chan[0, 0]).all():
            continue  # constant channel -> 0 (the reference's rule)
        chan = rescale_intensity(chan, out_range=(0.0, 1.0))
        out[:, :, c] = equalize_adapthist(chan, kernel_size=CLAHE_KERNEL_SIZE)
    return out


@lru_cache(maxsize=64)
def _aa_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Antialiased-bilinear taps (first index [out], weights [out, K]) exactly as torch computes them."""
    f32 = np.float32
    # torch (and PIL) compute these in the input's float type; float32 keeps us bit-identical.
    scale = f32(in_size) / f32(out_size)
    support = scale if scale >= 1 else f32(1.0)
    invscale = f32(1.0) / scale if scale >= 1 else f32(1.0)
    centre = scale * (np.arange(out_size, dtype=f32) + f32(0.5))
    first = np.maximum((centre - support + f32(0.5)).astype(np.int64), 0)
    stop = np.minimum((centre + support + f32(0.5)).astype(np.int64), in_size)
    count = stop - first
    k = int(count.max())
    j = np.arange(k)
    pos = (first[:, None] + j[None, :]).astype(f32)
    x = np.abs((pos - centre[:, None] + f32(0.5)) * invscale)
    w = np.where(x < 1, f32(1.0) - x, f32(0.0)).astype(f32)
    w[j[None, :] >= count[:, None]] = 0  # taps past this output's support
    total = w[:, 0].copy()
    for t in range(1, k):  # sequential float32 sum, like the C++ loop
        total += w[:, t]
    nonzero = total != 0
    w[nonzero] /= total[nonzero, None]
    w.flags.writeable = False
    first.flags.writeable = False
    return first, w


def _aa_pass(src: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable antialiased pass along `axis` of a float32 array."""
    in_size = src.shape[axis]
    if in_size == out_size:
        return src  # torch's weights are exactly the identity here
    first, w = _aa_taps(in_size, out_size)
    last = in_size - 1
    shape = [1] * src.ndim
    shape[axis] = out_size
    out = None
    # Sequential multiply-then-add per tap in float32 = torch's CPU kernel order; zero-weight
    # padding taps add exactly 0 for finite inputs.
    for t in range(w.shape[1]):
        idx = np.minimum(first + t, last)
        term = np.take(src, idx, axis=axis)
        term *= w[:, t].reshape(shape)
        if out is None:
            out = term
        else:
            out += term
    return out


def resize_antialias(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize (H,W[,C]) to (out_h,out_w[,C]) float32 like torch interpolate(bilinear, antialias=True)."""
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (H, W, C), got shape {img.shape}")
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {out_h}x{out_w}")
    src = np.ascontiguousarray(img, dtype=np.float32)
    planar = src[None] if src.ndim == 2 else np.ascontiguousarray(np.moveaxis(src, -1, 0))
    # torch resizes the width first, then the height.
    out = _aa_pass(_aa_pass(planar, out_w, axis=2), out_h, axis=1)
    if out is planar:
        out = planar.copy()
    return out[0] if img.ndim == 2 else np.ascontiguousarray(np.moveaxis(out, 0, -1))


def _as_planar(resized: np.ndarray) -> np.ndarray:
    """SxSx3 float image (what resize_antialias returns) -> contiguous float32 [3,S,S]."""
    resized = np.asarray(resized)
    if resized.ndim != 3 or resized.shape[-1] != 3:
        raise ValueError(f"expected an SxSx3 image, got shape {resized.shape}")
    return np.ascontiguousarray(np.moveaxis(resized, -1, 0), dtype=np.float32)


def _min_max(x: np.ndarray) -> np.ndarray:
    """Per-channel kornia normalize_min_max on [3,S,S] float32 (eps keeps constant channels at 0)."""
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    return (x - lo) / (hi - lo + MINMAX_EPS)


def _imagenet(x: np.ndarray) -> np.ndarray:
    """torchvision Normalize with ImageNet statistics, float32."""
    return (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


def encoder_input(resized: np.ndarray, has_model_cp: bool) -> np.ndarray:
    """SAM-branch input [3,S,S] float32 from the resized [0,1] image (docs/design.md §2.4)."""
    x = _as_planar(resized)
    nonzero = x[np.nonzero(x)]
    if nonzero.size:  # the reference crashes on an all-zero image; we leave it at 0
        lo, hi = np.percentile(nonzero, [0.0, SAM_PERCENTILE])
        x = rescale_intensity(x, in_range=(lo, hi), out_range="float32")
    if has_model_cp:
        x = _min_max(_imagenet(x))
    # The encoder's own pixel normalisation with div_255=True: SAM mean/std / 255 in float32.
    mean = (SAM_PIXEL_MEAN / np.float32(255))[:, None, None]
    std = (SAM_PIXEL_STD / np.float32(255))[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def cellfinder_input(resized: np.ndarray, has_model_cp: bool) -> np.ndarray:
    """CellFinder-branch input [3,S,S] float32 from the resized [0,1] image (docs/design.md §2.5)."""
    x = _as_planar(resized)
    # ToPILImage: mul(255) in float32 then truncation to uint8.
    u8 = (x * np.float32(255)).astype(np.uint8)
    x = (u8.astype(np.float32) - SAM_PIXEL_MEAN[:, None, None]) / SAM_PIXEL_STD[:, None, None]
    if has_model_cp:
        x = _min_max(_imagenet(x))
        # ToRGB: an empty channel 1 takes channel 2, then an empty channel 2 takes channel 1.
        if x[1].max() == 0:
            x[1] = x[2]
        if x[2].max() == 0:
            x[2] = x[1]
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess(image: np.ndarray, S: int, has_model_cp: bool,
               channels: ChannelSpec = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw image -> (encoder input [3,S,S], CellFinder input [3,S,S], normalised HxWx3 float64)."""
    normalized = normalize_channels(format_channels(image, channels))
    resized = resize_antialias(normalized, S, S)
    return encoder_input(resized, has_model_cp), cellfinder_input(resized, has_model_cp), normalized
