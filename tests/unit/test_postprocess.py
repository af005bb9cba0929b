"""Postprocessing (docs/design.md §2.8) against the reference implementation and skimage regionprops."""
from __future__ import annotations

import numpy as np
import pytest

from cellsam_rt.stages.postprocess import cell_table, fill_holes_and_remove_small, label_dtype, relabel_sequential


def _overlapping_labels(seed, shape=(120, 150), k=40):
    """Merged masks like the pipeline makes: disks, rings (holes), specks, later label wins."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros(shape, np.int64)
    for lab in range(1, k + 1):
        cy, cx = rng.uniform(-5, h + 5), rng.uniform(-5, w + 5)
        r = rng.uniform(1.5, 14)
        d = np.hypot(yy - cy, xx - cx)
        kind = lab % 5
        if kind == 0:  # ring: a hole that may hold other labels
            mask = (d < r + 3) & (d >= max(r - 2, 1))
        elif kind == 1:  # speck below min_size
            mask = d < rng.uniform(0.5, 2.5)
        elif kind == 2:  # disk with a punched hole
            mask = (d < r) & ~((np.abs(yy - cy) < 1.5) & (np.abs(xx - cx) < 1.5))
        else:
            mask = d < r
        labels = np.maximum(labels, mask * lab)
    if seed % 2:  # some label values never used (gaps before postprocessing)
        labels[labels == 7] = 0
    return labels


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("min_size", [25, 0])
def test_fill_holes_matches_reference(seed, min_size):
    R = pytest.importorskip("cellsam_export.reference")
    labels = _overlapping_labels(seed)
    expected = R.fill_holes_and_remove_small_masks(labels.copy(), min_size=min_size)
    for dtype in (np.int64, np.uint16, np.uint32):
        work = labels.astype(dtype)
        out = fill_holes_and_remove_small(work, min_size=min_size)
        assert out is work  # in place, as the reference
        np.testing.assert_array_equal(out, expected)


def test_fill_holes_quirks():
    labels = np.zeros((30, 30), np.uint16)
    labels[5:20, 5:20] = 2
    labels[10:14, 10:14] = 5  # label 5 sits in a hole of label 2 ...
    labels[25:28, 25:28] = 1  # ... and label 1 is a speck (9 px < 25)
    ring = labels == 2
    out = fill_holes_and_remove_small(labels.copy(), min_size=25)
    assert (out[25:28, 25:28] == 0).all()  # speck removed
    assert (out[10:14, 10:14] == 1).all()  # hole filled: label 5 overwritten, 2 renumbered to 1
    assert set(np.unique(out)) == {0, 1}
    assert ring.sum() + 16 == (out == 1).sum()


def test_relabel_sequential_matches_skimage():
    seg = pytest.importorskip("skimage.segmentation")
    labels = _overlapping_labels(3)
    labels[labels == 12] = 0
    labels[labels == 30] = 70000
    out, old_ids = relabel_sequential(labels)
    ref, _, inv = seg.relabel_sequential(labels)
    np.testing.assert_array_equal(out, ref)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(old_ids[out], labels)  # old_ids maps back
    assert old_ids[0] == 0 and np.all(np.diff(old_ids) > 0)
    big = np.array([[0, 4_000_000_000, 5]], np.uint32)  # sparse huge values take the sort path
    out, old_ids = relabel_sequential(big)
    np.testing.assert_array_equal(out, [[0, 2, 1]])
    np.testing.assert_array_equal(old_ids, [0, 5, 4_000_000_000])


def test_label_dtype():
    assert label_dtype(0) == np.uint16 and label_dtype(65535) == np.uint16
    assert label_dtype(65536) == np.uint32
    with pytest.raises(ValueError):
        label_dtype(-1)


def test_cell_table_matches_regionprops():
    measure = pytest.importorskip("skimage.measure")
    labels = fill_holes_and_remove_small(_overlapping_labels(5).astype(np.uint16))
    image = np.random.default_rng(0).random(labels.shape + (3,)).astype(np.float32)
    scores = {int(v): 0.5 + v / 1000 for v in np.unique(labels) if v}
    table = cell_table(labels, image, scores)
    props = measure.regionprops(labels.astype(np.int64), intensity_image=image)
    assert len(table) == len(props) > 10
    for row, p in zip(table, props):
        assert row["label"] == p.label and row["area"] == p.area
        assert row["centroid_y"] == pytest.approx(p.centroid[0], abs=1e-9)
        assert row["centroid_x"] == pytest.approx(p.centroid[1], abs=1e-9)
        assert (row["bbox_min_row"], row["bbox_min_col"], row["bbox_max_row"], row["bbox_max_col"]) == p.bbox
        assert row["score"] == pytest.approx(scores[p.label])
        for c in range(3):
            assert row[f"mean_intensity_{c}"] == pytest.approx(p.intensity_mean[c], rel=1e-6)


def test_cell_table_edge_cases():
    empty = cell_table(np.zeros((10, 12), np.uint16), np.ones((10, 12)))
    assert len(empty) == 0 and "mean_intensity_0" in empty.dtype.names
    labels = np.zeros((10, 12), np.uint32)
    labels[2:4, 3:7] = 9
    table = cell_table(labels, None, np.linspace(0, 1, 10))  # scores as an array indexed by label
    assert len(table) == 1 and table["area"][0] == 8 and table["score"][0] == pytest.approx(1.0)
    assert np.isnan(cell_table(labels)["score"][0])
    with pytest.raises(ValueError):
        cell_table(labels, np.ones((9, 12)))


def test_largest_parts_keeps_one_piece_per_label():
    from cellsam_rt.stages.postprocess import largest_parts

    labels = np.zeros((20, 30), np.int32)
    labels[2:10, 2:10] = 1
    labels[15:17, 15:17] = 1  # a speck of label 1 away from its object
    labels[2:10, 20:28] = 2
    labels[12:18, 20:28] = 2  # label 2 cut in two: the smaller part goes
    labels[12:14, 2:4] = 3  # one piece: untouched
    out = largest_parts(labels.copy())
    assert (out == 1).sum() == 64 and not out[15:17, 15:17].any()
    assert (out == 2).sum() == 64 and not out[12:18, 20:28].any()
    assert (out == 3).sum() == 4


def test_solidity_and_fragments():
    from cellsam_rt.stages.postprocess import MIN_SOLIDITY, drop_fragments, solidity

    yy, xx = np.mgrid[:60, :120]
    labels = np.zeros((60, 120), np.int32)
    labels[(yy - 30) ** 2 + (xx - 20) ** 2 <= 12 ** 2] = 1
    labels[10:50, 40:60] = 2
    disc = (yy - 30) ** 2 + (xx - 90) ** 2 <= 14 ** 2
    labels[disc & ((yy - 30) ** 2 + (xx - 97) ** 2 > 13 ** 2)] = 3  # what a neighbour leaves
    sol = solidity(labels)
    assert sol[2] == pytest.approx(1.0) and sol[1] > 0.9  # the hull's edge pixels count
    assert sol[3] < MIN_SOLIDITY
    before = labels.copy()
    out = drop_fragments(labels)
    assert out is labels  # in place
    assert set(np.unique(out)) == {0, 1, 2}
    np.testing.assert_array_equal(out[before != 3], before[before != 3])
    assert solidity(np.zeros((5, 5), np.int32)) == {}


def test_specks_far_below_the_median_area_go():
    from cellsam_rt.stages.postprocess import MIN_AREA_SHARE, drop_fragments

    labels = np.zeros((40, 200), np.int32)
    for k in range(1, 6):
        labels[5:25, 30 * k:30 * k + 20] = k          # five 400-pixel masks
    labels[30:35, 5:11] = 6                           # 30 pixels: 7.5 % of the median
    labels[30:38, 170:176] = 7                        # 48 pixels: 12 %
    assert 30 < MIN_AREA_SHARE * 400 < 48
    assert set(np.unique(drop_fragments(labels))) == {0, 1, 2, 3, 4, 5, 7}
    one = np.zeros((10, 10), np.int32)
    one[2:4, 2:4] = 1                                 # alone, it is its own median
    assert 1 in drop_fragments(one)
