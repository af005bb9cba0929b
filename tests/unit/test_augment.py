"""Test-time augmentation (pipeline/augment.py): an object is kept where two of the image's four
views (as given and mirrored) find it; the given view's masks are kept as drawn."""
from __future__ import annotations

import numpy as np
import pytest

from cellsam_rt.pipeline import augment
from cellsam_rt.pipeline.segmenter import Segmenter
from cellsam_rt.tools.evaluate import match_instances

from test_denoise import field


def square(labels: np.ndarray, value: int, y: int, x: int, size: int = 10) -> np.ndarray:
    labels[y:y + size, x:x + size] = value
    return labels


def view(*objects, shape=(64, 64)):
    """(labels, ids, boxes, scores) with the given (value, y, x) squares."""
    labels = np.zeros(shape, np.int32)
    for value, y, x in objects:
        square(labels, value, y, x)
    ids = np.array([o[0] for o in objects], np.int64)
    boxes = np.array([[x, y, x + 10, y + 10] for _, y, x in objects], np.float32).reshape(-1, 4)
    return labels, ids, boxes, ids.astype(np.float32) / 10


def test_objects_two_views_find_are_kept_and_the_rest_dropped():
    a, b, c = (2, 5), (30, 30), (50, 5)          # a: all views; b: the given view only; c: missed
    views = [view((3, *a), (7, *b)),
             view((1, *a), (2, *c)),
             view((5, a[0] + 1, a[1]), (9, c[0], c[1] + 1)),   # shifted a pixel: still the same
             view((4, *a))]
    labels, ids, boxes, scores = augment.merge_views(views)
    assert list(ids) == [3, 4]                   # a keeps its value, c is numbered after it
    np.testing.assert_array_equal(labels == 3, views[0][0] == 3)   # as the given view drew it
    assert not (labels == 7).any()               # b: found by one view only
    np.testing.assert_array_equal(labels == 4, views[1][0] == 2)   # c from the first view holding it
    np.testing.assert_allclose(boxes[1], [c[1], c[0], c[1] + 10, c[0] + 10])
    assert scores[1] == pytest.approx(0.2)


def test_an_agreed_object_over_a_kept_one_is_not_added_twice():
    # Two views draw a pair merged into one mask that the given view split: the merged mask
    # matches neither half, but most of it is taken, so it is not painted over the halves.
    given = view((1, 10, 10), (2, 10, 20))
    merged = np.zeros((64, 64), np.int32)
    merged[10:20, 10:30] = 5
    pair = (merged, np.array([5]), np.array([[10, 10, 30, 20]], np.float32), np.array([0.9]))
    labels, ids, _, _ = augment.merge_views([given, pair, pair, view((1, 10, 10), (2, 10, 20))])
    assert list(ids) == [1, 2]
    np.testing.assert_array_equal(labels, given[0])


def test_mirrored_boxes_are_mapped_back():
    labels = np.zeros((40, 60), np.int32)
    labels[5:15, 10:30] = 1
    for axes in augment.FLIPS:
        flipped = np.flip(labels, axes)
        ys, xs = np.nonzero(flipped)
        box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
        result = augment.SegmentationResult(labels=flipped, label_ids=np.array([1]), boxes=box,
                                            scores=np.array([0.9], np.float32), table=None)
        back, _, boxes, _ = augment._unflipped(result, axes, labels.shape)
        np.testing.assert_array_equal(back, labels)
        np.testing.assert_allclose(boxes[0], [10, 5, 30, 15])


def test_the_segmenter_keeps_what_two_views_find():
    image, truth = field(noise=60.0)
    off = Segmenter("default", threads=2, augment="off")
    flips = Segmenter("default", threads=2, augment="flips")
    result = flips.segment(image)
    views = [off.segment(image).labels] + [
        np.flip(off.segment(np.ascontiguousarray(np.flip(image, axes))).labels, axes)
        for axes in augment.FLIPS]
    assert result.labels.any()
    # Every kept object is one that at least two single views found, and the given view's
    # objects that another view confirms come out exactly as it drew them.
    for value in result.label_ids:
        mine = np.where(result.labels == value, 1, 0)
        assert sum(match_instances(v, mine).tp for v in views) >= augment.MIN_VOTES
    confirmed = [p[0] for p in match_instances(views[1], views[0]).pairs]
    for value in confirmed:
        assert np.array_equal(result.labels == value, views[0] == value)
    # The table and boxes describe the merged labels; each box's centre lies on its cell's box.
    present = np.unique(result.labels[result.labels > 0])
    np.testing.assert_array_equal(result.label_ids, present)
    np.testing.assert_array_equal(result.table["label"], present)
    for value, (x0, y0, x1, y1) in zip(result.label_ids, result.boxes):
        ys, xs = np.nonzero(result.labels == value)
        assert xs.min() - 2 <= (x0 + x1) / 2 <= xs.max() + 2
        assert ys.min() - 2 <= (y0 + y1) / 2 <= ys.max() + 2
    assert "augment" in result.timings
    # Under this much noise a single view takes noise for nuclei; the views seldom agree on it.
    once, agreed = match_instances(views[0], truth).f1, match_instances(result.labels, truth).f1
    assert agreed >= 0.95 and agreed > once + 0.03


def test_the_channel_axis_is_not_mirrored():
    # A two-channel image given channels first or last: the views flip its rows and columns.
    image, truth = field(noise=30.0, size=160)
    first = np.stack([image, image // 2])
    flips = Segmenter("default", threads=2, augment="flips")
    a, b = flips.segment(first), flips.segment(np.moveaxis(first, 0, -1))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.labels.shape == image.shape and match_instances(a.labels, truth).f1 >= 0.8


def test_user_boxes_are_segmented_once():
    image, truth = field(noise=30.0)
    boxes = np.array([[8, 8, 34, 34], [30, 30, 58, 58]], np.float32)
    given = Segmenter("default", threads=2, augment="flips").segment(image, boxes=boxes)
    once = Segmenter("default", threads=2, augment="off").segment(image, boxes=boxes)
    np.testing.assert_array_equal(given.labels, once.labels)
    assert "augment" not in given.timings


@pytest.mark.parametrize("key, mode, noise", [("denoise", "gaussian", 120.0),
                                             ("augment", "flips", 60.0)])
def test_the_command_line_passes_the_option_and_records_it(tmp_path, key, mode, noise):
    import tifffile

    from cellsam_rt.cli import main as cli
    from cellsam_rt.workflows.ledger import Ledger

    image, truth = field(noise=noise)
    tifffile.imwrite(tmp_path / "field.tif", image)
    out = tmp_path / "out"
    assert cli.main(["run", str(tmp_path / "field.tif"), "--out", str(out), "--threads", "2",
                     f"--{key}", mode]) == 0
    labels = tifffile.imread(out / "field_labels.tif")
    np.testing.assert_array_equal(
        labels, Segmenter("default", threads=2, **{key: mode}).segment(image).labels)
    assert match_instances(labels, truth).f1 >= 0.7
    (record,) = Ledger(out / "ledger.jsonl").done.values()
    assert record["options"][key] == mode
