"""Outline refinement (stages/outline.py): each mask's edge is redrawn at a fixed fraction of its
contrast, within a band around the decoded outline, keeping labels, cores and neighbours."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cellsam_rt.pipeline.segmenter import Segmenter
from cellsam_rt.stages import outline
from cellsam_rt.tools.evaluate import match_instances, truth_boxes
from test_native_tiles import planted

CENTRES = [(40 + 58 * i, 40 + 58 * j) for i in range(4) for j in range(4)]


def _disc(shape, cy, cx, r):
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.fixture(scope="module")
def blurred():
    """A blurred disc of radius 14 (edge at half its contrast) and its truth."""
    truth = _disc((80, 80), 40, 40, 14)
    image = cv2.GaussianBlur(truth.astype(np.float32) * 1000 + 100, (0, 0), 1.5)
    return image, truth


@pytest.mark.parametrize("off", [-2, 2])
def test_an_outline_a_band_off_moves_onto_the_edge(blurred, off):
    image, truth = blurred
    labels = _disc(truth.shape, 40, 40, 14 + off).astype(np.int32) * 7
    out = outline.refine_outlines(labels, image, fraction=0.5)
    assert set(np.unique(out)) == {0, 7}  # the label value is kept
    assert _iou(labels == 7, truth) < 0.82
    assert _iou(out == 7, truth) > 0.95


def test_the_fraction_sets_the_depth_of_the_edge(blurred):
    image, truth = blurred
    labels = truth.astype(np.int32)
    low = outline.refine_outlines(labels, image, fraction=0.2).sum()
    high = outline.refine_outlines(labels, image, fraction=0.8).sum()
    assert low > truth.sum() > high


def test_neighbours_small_masks_and_packed_masks_are_left_alone(blurred):
    image, truth = blurred
    labels = np.zeros(truth.shape, np.int32)
    labels[_disc(truth.shape, 40, 40, 12)] = 1
    labels[:, 60:] = 2  # a neighbour with no contrast of its own: kept as decoded
    labels[2:6, 2:6] = 3  # under MIN_AREA
    out = outline.refine_outlines(labels, image)
    assert (out == 1).sum() > (labels == 1).sum()  # grew toward the edge...
    np.testing.assert_array_equal(out == 2, labels == 2)  # ...but not into the neighbour
    np.testing.assert_array_equal(out == 3, labels == 3)
    whole = np.ones(truth.shape, np.int32)  # no surround to read: as decoded
    np.testing.assert_array_equal(outline.refine_outlines(whole, image), whole)
    with pytest.raises(ValueError, match="same shape"):
        outline.refine_outlines(labels, image[:10])


def test_a_mask_over_a_dim_neighbour_keeps_its_core():
    """A mask spanning a bright nucleus and a dim one would lose most of itself: the area guard
    keeps it as decoded; a fragmenting threshold keeps the part holding the decoded mask."""
    image = np.full((80, 80), 100.0, np.float32)
    image[_disc(image.shape, 40, 30, 10)] = 2000
    image[_disc(image.shape, 40, 52, 10)] = 300
    labels = (_disc(image.shape, 40, 30, 10) | _disc(image.shape, 40, 52, 10)).astype(np.int32)
    np.testing.assert_array_equal(outline.refine_outlines(labels, image), labels)


def test_faint_objects_are_removed():
    image = np.full((120, 200), 100.0, np.float32)
    labels = np.zeros(image.shape, np.int32)
    for k, cx in enumerate(range(20, 200, 30), 1):
        disc = _disc(image.shape, 40, cx, 10)
        image[disc] += 900 if k != 3 else 40  # label 3: 4 % of the others' contrast
        labels[disc] = k
    image = cv2.GaussianBlur(image, (0, 0), 1.0)
    out = outline.refine_outlines(labels, image)
    assert set(np.unique(out)) == {0, 1, 2, 4, 5, 6}
    assert 3 in outline.refine_outlines(labels, image, faint=0.0)
    dark = labels.copy()  # an object darker than its surround goes whatever the share
    hole = _disc(image.shape, 90, 100, 10)
    dark[hole] = 9
    assert 9 not in outline.refine_outlines(dark, np.where(hole, 50, image), faint=0.0)


def test_the_result_follows_the_objects_dropped(monkeypatch):
    image, _ = planted(256, CENTRES, 13)
    full = Segmenter("default", threads=2).segment(image)
    refine = outline.refine_outlines

    def drop_first(labels, plane, **kw):
        out = refine(labels, plane, **kw)
        out[out == full.label_ids[0]] = 0
        return out

    monkeypatch.setattr(outline, "refine_outlines", drop_first)
    got = Segmenter("default", threads=2).segment(image)
    assert len(got.label_ids) == len(full.label_ids) - 1 == len(got.scores) == len(got.boxes)
    assert set(got.label_ids) == set(np.unique(got.labels)) - {0} == set(got.table["label"])
    np.testing.assert_array_equal(got.boxes, full.boxes[1:])
    np.testing.assert_array_equal(got.scores, full.scores[1:])


def test_a_faint_object_goes_unless_a_box_asks_for_it():
    image, truth = planted(256, CENTRES[:8], 13)
    image = image.astype(np.float32)
    faint = _disc(image.shape, 200, 200, 13)
    image[faint] += 30  # 3 % of the planted discs' contrast
    boxes = np.vstack([truth_boxes(truth), [[187, 187, 214, 214]]]).astype(np.float32)
    seg = Segmenter("default", threads=2)
    kept = Segmenter("default", threads=2, outline="model").segment(image, boxes=boxes)
    assert kept.labels[faint].any()  # the box's mask is decoded...
    assert seg.segment(image, boxes=boxes).labels[faint].any()  # a user's box is a cell to keep
    labels = seg.segment(image).labels.copy()
    labels[faint] = labels.max() + 1  # as if the detector had found it
    out = outline.refine_outlines(labels, image)
    assert not out[faint].any()  # ...which is removed as too faint
    got = seg.segment(image)
    assert len(got.label_ids) == len(got.scores) == len(got.boxes) == len(got.table)
    assert set(got.label_ids) == set(np.unique(got.labels)) - {0}


def test_the_default_model_refines_single_channel_images_only():
    image, truth = planted(256, CENTRES, 13)
    seg = Segmenter("default", threads=2)
    assert seg.outline == "contrast"  # the default model's manifest asks for it
    model = Segmenter("default", threads=2, outline="model")
    a, b = seg.segment(image), model.segment(image)
    assert match_instances(a.labels, truth).mean_iou >= match_instances(b.labels, truth).mean_iou
    assert "outline" in a.timings and "outline" not in b.timings
    two = np.dstack([image, image // 2])  # no edges read, but every mask kept in one piece
    whole, decoded = seg.segment(two).labels, model.segment(two).labels
    assert ((whole == decoded) | (whole == 0)).all()
    for labels in (a.labels, whole):
        for value in np.unique(labels)[1:]:
            assert cv2.connectedComponents((labels == value).view(np.uint8))[0] == 2


@pytest.mark.parametrize("channels", [1, 2])
def test_fragments_go_unless_a_box_asks_for_them(channels):
    image = np.full((80, 160), 100.0, np.float32)
    labels = np.zeros(image.shape, np.int32)
    for k, cx in enumerate((30, 80), 1):
        disc = _disc(image.shape, 40, cx, 14)
        image[disc] += 900
        labels[disc] = k
    labels[_disc(image.shape, 40, 130, 14) & ~_disc(image.shape, 40, 137, 13)] = 3  # a crescent
    image = cv2.GaussianBlur(image, (0, 0), 1.0)
    plane = image if channels == 1 else None  # several channels: edges left as decoded
    assert set(np.unique(outline.contrast_outlines(labels.copy(), plane, False))) == {0, 1, 2}
    assert 3 in outline.contrast_outlines(labels.copy(), plane, True)  # a user's box: a cell
