"""The synthetic training-data generator: deterministic, labels that match the pixels, 1 and 2 channels."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # cellsam_export needs the [export] extra
from cellsam_train.synth import KINDS, generate  # noqa: E402


def _label_contrast(image: np.ndarray, labels: np.ndarray) -> float:
    """Median over cells of (mean inside) / (mean background)."""
    img = image.astype(np.float64)
    bg = img[labels == 0].mean() + 1e-6
    means = np.bincount(labels.ravel(), weights=img.ravel()) / np.maximum(np.bincount(labels.ravel()), 1)
    return float(np.median(means[1:][np.bincount(labels.ravel())[1:] > 0]) / bg)


def test_same_seed_same_sample_other_seed_other_sample():
    a, b, c = generate(11), generate(11), generate(12)
    assert a.kind == b.kind
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("kind", KINDS)
def test_labels_are_consistent_with_the_image(kind):
    for seed in range(3):
        s = generate(seed, kind=kind)
        h, w = s.labels.shape
        assert s.image.shape[:2] == (h, w)
        assert s.image.dtype in (np.uint8, np.uint16)
        assert s.labels.dtype == np.int32 and s.labels.min() == 0
        ids = np.unique(s.labels)[1:]
        assert len(ids) >= 1 and s.num_cells == len(ids)
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # contiguous numbering
        # Every labelled cell has a real size, and the stain it is labelled from is brighter
        # inside cells than in the background.
        assert np.bincount(s.labels.ravel())[1:].min() >= 6
        stain = s.image if s.image.ndim == 2 else s.image[..., 1]
        assert _label_contrast(stain, s.labels) > 1.5
        if kind == "cells2":
            nuc = s.image[..., 0]
            assert _label_contrast(nuc, s.labels) > 1.0


def test_channel_counts():
    assert generate(0, kind="nuclei").image.ndim == 2
    assert generate(0, kind="cells").image.ndim == 2
    two = generate(0, kind="cells2").image
    assert two.ndim == 3 and two.shape[-1] == 2
    # The nuclear channel is concentrated in nuclei: far less of it than of the whole-cell stain
    # lies above its own median-of-foreground level.
    assert not np.array_equal(two[..., 0], two[..., 1])


def test_cell_sizes_follow_the_model_scale():
    # Cells are drawn in model pixels: after resizing the canvas to model_size, the median cell
    # diameter lies in the generator's 9-70 px range whatever the native canvas size.
    for seed in range(6):
        s = generate(seed, kind="nuclei", model_size=512)
        h, w = s.labels.shape
        areas = np.bincount(s.labels.ravel())[1:]
        d_model = 2 * np.sqrt(np.median(areas) / np.pi) * 512 / ((h + w) / 2)
        assert 5 < d_model < 80


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        generate(0, kind="bacteria")


def test_generator_versions():
    # Earlier versions (earlier training stages) stay reproducible; each version draws different
    # nuclei images (v2: dim subpopulations, defocus; v3: smooth soft-edged nuclei, wider PSF).
    samples = {v: generate(4, kind="nuclei", version=v) for v in (1, 2, 3)}
    for v, s in samples.items():
        again = generate(4, kind="nuclei", version=v)
        assert np.array_equal(s.labels, again.labels) and np.array_equal(s.image, again.image)
        assert _label_contrast(s.image, s.labels) > 1.2
    for a, b in ((1, 2), (2, 3)):
        sa, sb = samples[a], samples[b]
        assert not (sa.image.shape == sb.image.shape and np.array_equal(sa.image, sb.image))
    with pytest.raises(ValueError, match="version"):
        generate(0, version=6)


def test_version4_covers_sizes_contrasts_and_stays_reproducible():
    # Version 4 draws nuclei 6-120 px across at model scale, mostly 15-60 px; some images have
    # inverted contrast (nuclei darker than the background); labels stay contiguous.
    diam, inverted, kinds = [], 0, set()
    for seed in range(40):
        s = generate(seed, model_size=192, version=4)
        again = generate(seed, model_size=192, version=4)
        assert np.array_equal(s.image, again.image) and np.array_equal(s.labels, again.labels)
        kinds.add(s.kind)
        ids = np.unique(s.labels)[1:]
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))
        if s.kind != "nuclei":
            continue
        h, w = s.labels.shape
        areas = np.bincount(s.labels.ravel())[1:]
        diam.append(2 * np.sqrt(np.median(areas) / np.pi) * 192 / ((h + w) / 2))
        inverted += _label_contrast(s.image, s.labels) < 1.0
    assert kinds == set(KINDS)
    diam = np.array(diam)
    assert diam.min() < 15 and diam.max() > 45
    assert 0.5 < np.mean((diam > 12) & (diam < 65))
    assert inverted >= 1 and inverted < len(diam) / 2


def test_version4_differs_from_version3():
    a, b = generate(5, kind="nuclei", version=3), generate(5, kind="nuclei", version=4)
    assert not (a.image.shape == b.image.shape and np.array_equal(a.image, b.image))


def test_version4_regimes_force_their_kind_of_image():
    from cellsam_train.synth_v4 import REGIMES

    def model_diameter(s, size, q=50):
        areas = np.bincount(s.labels.ravel())[1:]
        return 2 * np.sqrt(np.percentile(areas[areas > 0], q) / np.pi) * size / np.mean(s.labels.shape)

    got = {r: generate(7, model_size=192, version=4, regime=r) for r in REGIMES
           if r != "hazy"}
    assert got["cells2"].image.ndim == 3 and got["small"].image.ndim == 2
    assert model_diameter(got["small"], 192) < 17
    assert model_diameter(got["large_textured"], 192, q=90) > 50  # (some are cut by the border)
    assert _label_contrast(got["inverted"].image, got["inverted"].labels) < 1.0
    with pytest.raises(ValueError, match="regime"):
        generate(7, version=3, regime="small")


def test_version5_haze_lies_around_the_nuclei_outside_every_label():
    import cv2
    from cellsam_train.synth_v4 import REGIMES, _haze

    labels = np.zeros((200, 200), np.int32)
    cv2.circle(labels, (50, 60), 10, 1, -1)
    cv2.circle(labels, (120, 70), 10, 2, -1)
    dist = cv2.distanceTransform((labels == 0).astype(np.uint8), cv2.DIST_L2, 5)
    for seed in range(5):
        haze = _haze(np.random.default_rng(seed), labels, 20.0, 1.0, 0.2)
        assert haze[(dist > 2) & (dist < 8)].mean() > 0.02   # cytoplasm beside each nucleus
        assert haze[dist > 120].max() < 1e-3                 # nothing far from every cell
        assert haze.max() < 0.2 * 1.7 + 0.1
    # The regime draws hazy nuclei images from version 5, reproducibly; version 4 has no haze.
    assert REGIMES["hazy"]["kind"] == "nuclei"
    s = generate(3, model_size=256, version=5, regime="hazy")
    again = generate(3, model_size=256, version=5, regime="hazy")
    assert np.array_equal(s.image, again.image) and np.array_equal(s.labels, again.labels)
    with pytest.raises(ValueError, match="regime"):
        generate(7, version=4, regime="hazy")


def test_kinds_limit_what_is_drawn_and_keep_the_seeds_images():
    allowed = ("nuclei", "cells2")
    drawn = set()
    for seed in range(40):
        full = generate(seed, model_size=96, version=4)
        some = generate(seed, model_size=96, version=4, kinds=allowed)
        drawn.add(some.kind)
        if full.kind in allowed:  # the same draw: the same image
            assert some.kind == full.kind
            np.testing.assert_array_equal(some.image, full.image)
    assert drawn == set(allowed)
    assert {generate(s, model_size=64, version=3, kinds=("cells",)).kind for s in range(3)} == {"cells"}
    with pytest.raises(ValueError, match="kinds must be some of"):
        generate(0, kinds=("nuclei", "tissue"))
