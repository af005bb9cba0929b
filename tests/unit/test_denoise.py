"""Noise smoothing (stages/denoise.py): a very noisy image is smoothed as much as its noise
needs before the model reads it, a clean one is read as given, and the cell table measures the
image as given."""
from __future__ import annotations

import numpy as np

from cellsam_rt.pipeline.segmenter import Segmenter
from cellsam_rt.stages import denoise
from cellsam_rt.stages.scale import background
from cellsam_rt.tools.evaluate import match_instances

CENTRES = [(40 + 58 * i, 40 + 58 * j) for i in range(4) for j in range(4)]


def discs(noise: float, contrast: float = 120.0, size: int = 256, radius: float = 13,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 image, truth): bright discs under Gaussian camera noise of std `noise`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    clean = np.full((size, size), 200.0)
    truth = np.zeros((size, size), np.int32)
    for k, (cy, cx) in enumerate(CENTRES, 1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        clean[disc] += contrast
        truth[disc] = k
    image = clean + rng.normal(0, noise, clean.shape)
    return np.clip(image, 0, 65535).astype(np.uint16), truth


def test_a_clean_image_is_read_as_given():
    image, _ = discs(noise=2.0)
    assert denoise.noise_sigma(image) == 0.0
    assert denoise.denoised(image) is None
    assert denoise.denoised(np.full((32, 32), 7, np.uint8)) is None  # flat: nothing to smooth


def test_noisier_images_are_smoothed_more_up_to_the_cap():
    sigmas = [denoise.noise_sigma(discs(noise=n)[0]) for n in (15.0, 30.0, 60.0)]
    assert denoise.MIN_SIGMA <= sigmas[0] < sigmas[1] < sigmas[2] <= denoise.MAX_SIGMA
    # Pure noise spans about 4.7 noise deviations: only a high target reaches the cap.
    assert denoise.noise_sigma(discs(noise=400.0)[0], target=200.0) == denoise.MAX_SIGMA


def test_smoothing_brings_the_noise_down_and_keeps_the_layout():
    image, _ = discs(noise=30.0)
    out = denoise.denoised(image)
    assert out.shape == image.shape and out.dtype == np.float32
    assert background(out).noise < 0.5 * background(image).noise
    # Channel axes stay where they were (the smallest axis is the channel axis).
    two = np.stack([image, image // 2])
    out2 = denoise.denoised(two)
    assert out2.shape == two.shape
    np.testing.assert_allclose(out2[0], out, atol=1e-3)
    last = denoise.denoised(np.moveaxis(two, 0, -1))
    np.testing.assert_allclose(last, np.moveaxis(out2, 0, -1), atol=1e-3)


def field(noise: float, contrast: float = 100.0, size: int = 256, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 image, truth): a dense field of nuclei (about 18 px across, uneven brightness)
    under Gaussian camera noise of std `noise`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    clean = np.full((size, size), 200.0)
    truth = np.zeros((size, size), np.int32)
    k = 0
    for cy in range(14, size - 10, 24):
        for cx in range(14, size - 10, 24):
            y, x = cy + rng.integers(-3, 4), cx + rng.integers(-3, 4)
            disc = ((yy - y) ** 2 + (xx - x) ** 2 <= (9 * rng.uniform(0.8, 1.15)) ** 2) & (truth == 0)
            k += 1
            clean[disc] += contrast * rng.uniform(0.7, 1.3)
            truth[disc] = k
    image = clean + rng.normal(0, noise, clean.shape)
    return np.clip(image, 0, 65535).astype(np.uint16), truth


def test_nuclei_under_heavy_noise_are_found_after_smoothing():
    image, truth = field(noise=120.0)
    smoothed = Segmenter("default", threads=2, denoise="gaussian")
    given = Segmenter("default", threads=2, denoise="off")
    assert smoothed.prepare(image).view is not None and given.prepare(image).view is None
    found = smoothed.segment(image)
    assert match_instances(found.labels, truth).f1 >= 0.7
    assert match_instances(given.segment(image).labels, truth).f1 < 0.4
    # The table measures the image as given, not the smoothed one the model read.
    inside = found.labels > 0
    sums = np.bincount(found.labels[inside], weights=image[inside].astype(np.float64))
    means = sums / np.maximum(np.bincount(found.labels[inside]), 1)
    table = found.table
    np.testing.assert_allclose(table["mean_intensity_0"], means[table["label"]], rtol=1e-5)


def test_smoothing_the_detector_reads_worse_is_not_used():
    """Smoothed noise on a wide empty background turns into blobs the size of small nuclei: the
    detector is less sure of that view, so the image is read as given."""
    image, truth = discs(noise=35.0, contrast=110.0)
    assert denoise.denoised(image) is not None  # noisy enough to be a candidate
    seg = Segmenter("default", threads=2, denoise="gaussian")
    assert seg.prepare(image).view is None
    kept = seg.segment(image)
    np.testing.assert_array_equal(
        kept.labels, Segmenter("default", threads=2, denoise="off").segment(image).labels)
    assert match_instances(kept.labels, truth).f1 >= 0.85


def test_a_large_noisy_image_is_smoothed_on_the_native_scale_path():
    tile, truth = field(noise=120.0)
    image = np.block([[tile, tile, tile]] * 3)  # 768 px: tiled at its own scale
    big = np.zeros(image.shape, np.int32)
    for k, (i, j) in enumerate([(i, j) for i in range(3) for j in range(3)]):
        big[256 * i:256 * (i + 1), 256 * j:256 * (j + 1)] = np.where(truth > 0,
                                                                     truth + 1000 * k, 0)
    result = Segmenter("default", threads=2, denoise="gaussian").segment(image)
    assert result.tiled
    assert match_instances(result.labels, big).f1 >= 0.7
