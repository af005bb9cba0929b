"""Object polarity (pipeline/polarity.py): dark objects on a bright background are inverted for
the model, fluorescence images are left alone, and the cell table measures the image as given."""
from __future__ import annotations

import numpy as np
import pytest

from cellsam_rt.pipeline import polarity
from cellsam_rt.pipeline.segmenter import Segmenter
from cellsam_rt.tools.evaluate import match_instances
from test_native_tiles import planted

CENTRES = [(40 + 58 * i, 40 + 58 * j) for i in range(4) for j in range(4)]


def test_inversion_keeps_dtype_and_range():
    u8 = np.array([[0, 10], [200, 250]], np.uint8)
    assert polarity.inverted(u8).dtype == np.uint8
    np.testing.assert_array_equal(polarity.inverted(u8), [[250, 240], [50, 0]])
    f = np.array([[-1.0, 0.5], [2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(polarity.inverted(f), [[3.0, 1.5], [0.0, -1.0]])
    i16 = np.array([[-5, 0], [5, 7]], np.int16)
    np.testing.assert_array_equal(polarity.inverted(i16), [[7, 2], [-3, -5]])
    np.testing.assert_array_equal(polarity.inverted(np.array([True, False])), [False, True])


def test_the_skewness_gate_tells_fluorescence_from_dark_objects():
    bright, _ = planted(256, CENTRES, 13)
    assert polarity.skewness(bright) > 1.0 > polarity.SKEW_GATE
    assert polarity.skewness(polarity.inverted(bright)) < -1.0
    assert polarity.skewness(np.full((8, 8), 3)) == 0.0
    hot = bright.copy()
    hot[:3, :3] = 65535  # a few saturated pixels do not set it
    assert polarity.skewness(hot) == pytest.approx(polarity.skewness(bright), rel=0.05)


@pytest.fixture(scope="module")
def discs():
    bright, truth = planted(256, CENTRES, 13)
    return bright, polarity.inverted(bright), truth


def test_dark_objects_are_segmented_as_their_bright_twins(discs):
    bright, dark, truth = discs
    seg = Segmenter("default", threads=2)
    a, b = seg.segment(bright), seg.segment(dark)
    assert match_instances(a.labels, truth).f1 == 1.0
    assert match_instances(b.labels, truth).f1 == 1.0
    # The table measures the image as given: dark cells on a bright background.
    assert b.table["mean_intensity_0"].max() < np.median(dark)
    assert a.table["mean_intensity_0"].min() > np.median(bright)
    kept = Segmenter("default", threads=2, polarity="bright").segment(dark)
    assert match_instances(kept.labels, truth).f1 < 0.5  # the model cannot read them as they are
    forced = Segmenter("default", threads=2, polarity="dark").segment(dark)
    np.testing.assert_array_equal(forced.labels, b.labels)


def test_the_detector_decides_past_the_gate(monkeypatch, discs):
    """An image past the gate is inverted only when the detector is surer of the inverted view
    by the margin (a dense fluorescence image the gate lets through stays as given)."""
    _, dark, _ = discs
    seg = Segmenter("default", threads=2)
    calls = []

    def confidence(s, image, channels, scale):
        calls.append(scale)
        return 0.0, float(np.median(image) < 500)  # "surer" on the dark-backed view

    monkeypatch.setattr(polarity, "detect_diameter", confidence)
    assert polarity.orient(seg, dark) is not None  # inverted view has the dark background
    assert calls
    calls.clear()
    bright = polarity.inverted(dark)
    assert polarity.orient(seg, bright) is None and not calls  # skewed right: no model call
    monkeypatch.setattr(polarity, "detect_diameter",
                        lambda s, image, c, sc: (0.0, 1.04 if np.median(image) < 500 else 1.0))
    assert polarity.orient(seg, dark) is None  # surer by less than the margin: kept as given
    assert polarity.orient(seg, np.dstack([dark, dark])) is None  # several channels: as given


def test_an_unknown_polarity_is_refused():
    with pytest.raises(ValueError, match="polarity must be one of"):
        Segmenter("default", polarity="negative")
