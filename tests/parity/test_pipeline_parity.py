"""End-to-end parity: `Segmenter` (ONNX Runtime, torch-free) vs the PyTorch `ReferencePipeline`.

The conftest fixtures' random weights keep no mask at all, so parity on them alone would be
vacuous (they are still compared, below). The main cases use the same fixture models with
CellFinder and the mask decoder re-shaped so that they find distinct, box-dependent cells (see
shaped_model.py), and every such case asserts that the reference finds more than 5 cells.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cellsam_export.checkpoint import load_checkpoint  # noqa: E402
from cellsam_export.reference import ReferencePipeline  # noqa: E402
from shaped_model import USER_BOXES, blob_image, fixture_checkpoint, shaped_model_dir  # noqa: E402

from cellsam_rt.pipeline import segmenter as pipeline  # noqa: E402
from cellsam_rt.pipeline.segmenter import Segmenter  # noqa: E402

@pytest.fixture(scope="module")
def shaped(tmp_path_factory, tiny_model_dir, tiny_model_dir_cp):
    """{has_model_cp: (model dir, ReferencePipeline)} for the shaped tiny models."""
    torch.set_num_threads(2)
    out = {}
    for cp, fixture in ((False, tiny_model_dir), (True, tiny_model_dir_cp)):
        d, ckpt = shaped_model_dir(Path(fixture), tmp_path_factory.mktemp(f"shaped_{cp}"), cp)
        out[cp] = (d, ReferencePipeline(load_checkpoint(ckpt)[0]))
    return out


# ----------------------------------------------------------------------------- comparison


def match_cells(ours: np.ndarray, ref: np.ndarray) -> tuple[bool, int, float]:
    """(identical?, number of reference cells, worst best-IoU of a reference cell in ours)."""
    ref = np.asarray(ref, dtype=np.int64)
    ours = np.asarray(ours, dtype=np.int64)
    ids = np.unique(ref[ref > 0])
    worst = 1.0
    for k in ids:
        m = ref == k
        cand, inter = np.unique(ours[m], return_counts=True)
        best = 0.0
        for c, i in zip(cand, inter):
            if c:
                best = max(best, i / (m.sum() + (ours == c).sum() - i))
        worst = min(worst, best)
    return bool(np.array_equal(ours, ref)), len(ids), worst


def reference_label_prompts(ref, img, want) -> dict:
    """Oracle: final reference label -> index of the prompt that made it.

    Replays the reference's hole filling (cellpose-derived, reference utils.py) on the
    reference's own merged masks, recording which merged label each renumbered label came from.
    """
    from scipy import ndimage

    from cellsam_export.reference import decode_masks_per_box, merge_masks

    emb = torch.from_numpy(want.embeddings)
    with torch.no_grad():
        masks, _, kept = decode_masks_per_box(ref.model, emb, want.boxes, img.shape[:2])
    labels = merge_masks(masks, img.shape[:2])
    source, j = {}, 0
    for i, slc in enumerate(ndimage.find_objects(labels)):
        if slc is None:
            continue
        msk = labels[slc] == i + 1
        if msk.sum() < 25:
            labels[slc][msk] = 0
        elif msk.any():
            labels[slc][ndimage.binary_fill_holes(msk)] = j + 1
            source[j + 1] = int(kept[i])
            j += 1
    assert np.array_equal(labels, want.labels)  # the replay is the reference
    present = set(np.unique(labels[labels > 0]).tolist())
    return {v: k for v, k in source.items() if v in present}


def assert_parity(ours, ref_labels, min_cells=6):
    identical, n_ref, worst = match_cells(ours.labels, ref_labels)
    assert n_ref >= min_cells, f"only {n_ref} reference cells: the comparison would be vacuous"
    assert identical or worst >= 0.99, f"{n_ref} cells, worst IoU {worst:.4f}"
    assert ours.n_cells == n_ref
    return identical, n_ref, worst


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("cp", [False, True], ids=["no_model_cp", "model_cp"])
@pytest.mark.parametrize("channels", [1, 2])
def test_parity_detected_cells(shaped, cp, channels):
    model_dir, ref = shaped[cp]
    img = blob_image(channels=channels)
    want = ref.segment(img, bbox_threshold=0.4)
    got = Segmenter(model_dir, tile="never").segment(img)
    identical, n, worst = assert_parity(got, want.labels)
    print(f"parity cp={cp} channels={channels}: {n} cells, identical={identical}, "
          f"min IoU={worst:.4f}")
    assert got.labels.dtype == np.uint16 and not got.tiled
    # Each label carries the box and score of the detection that made it.
    expected = reference_label_prompts(ref, img, want)
    assert sorted(expected) == list(got.label_ids)
    s = ref.size
    h, w = img.shape[:2]
    scale = np.array([w / s, h / s, w / s, h / s], np.float32)
    for label, box, score in zip(got.label_ids, got.boxes, got.scores):
        j = expected[int(label)]
        np.testing.assert_allclose(box, want.boxes[j] * scale, rtol=1e-4, atol=1e-3)
        assert score == pytest.approx(float(want.scores[j]), abs=1e-5)
    assert len(got.table) == got.n_cells
    np.testing.assert_array_equal(got.table["label"], got.label_ids)
    np.testing.assert_allclose(got.table["score"], got.scores, rtol=1e-6)


@pytest.mark.parametrize("cp", [False, True], ids=["no_model_cp", "model_cp"])
def test_parity_user_boxes(shaped, cp):
    model_dir, ref = shaped[cp]
    img = blob_image(channels=2)
    want = ref.segment(img, boxes=USER_BOXES)
    got = Segmenter(model_dir, tile="never").segment(img, boxes=USER_BOXES)
    identical, n, worst = assert_parity(got, want.labels)
    print(f"user boxes cp={cp}: {n} cells, identical={identical}, min IoU={worst:.4f}")
    assert np.isnan(got.scores).all()  # user boxes carry no detection score
    for box in got.boxes:  # each label's box is one of the user's boxes
        assert np.abs(USER_BOXES - box).sum(axis=1).min() < 1e-3


@pytest.mark.parametrize("cp", [False, True], ids=["no_model_cp", "model_cp"])
def test_parity_on_fixture_models(tmp_path, tiny_model_dir, tiny_model_dir_cp, cp):
    """The fixture dirs against their own checkpoints (random weights drop every mask)."""
    model_dir = Path(tiny_model_dir_cp if cp else tiny_model_dir)
    ref = ReferencePipeline(load_checkpoint(fixture_checkpoint(model_dir, tmp_path, cp))[0])
    img = blob_image(channels=2)
    want = ref.segment(img)
    got = Segmenter(model_dir, tile="never").segment(img)
    assert len(want.boxes) > 5  # CellFinder did detect; the decoder's IoU filter drops them
    assert np.array_equal(got.labels, want.labels)
    assert got.n_cells == 0 and len(got.table) == 0 and got.labels.dtype == np.uint16


def test_no_cells_gives_zero_labels(tiny_model_dir, shaped):
    # A model that keeps no mask, an all-zero image (the reference crashes there), empty boxes.
    zeros = np.zeros((120, 90), np.float32)
    for seg, kwargs in ((Segmenter(tiny_model_dir, tile="never"), {}),
                        (Segmenter(tiny_model_dir, tile="auto"), {}),
                        (Segmenter(shaped[False][0], tile="never"),
                         {"boxes": np.zeros((0, 4), np.float32)})):
        for img in (zeros, blob_image()):
            res = seg.segment(img, **kwargs)
            assert res.labels.shape == img.shape[:2] and res.labels.dtype == np.uint16
            assert not res.labels.any() and res.n_cells == 0 and len(res.table) == 0
            assert res.boxes.shape == (0, 4) and res.scores.shape == (0,)
            assert not res.tiled  # no cells: nothing to gauge, like the reference


def test_label_dtype_past_65535(shaped, monkeypatch):
    seg = Segmenter(shaped[False][0], tile="never")
    big = np.zeros((50, 60), np.int32)
    big[:5, :5] = 70000
    big[10:15, :5] = 3

    def fake(images, user_boxes, timer, inputs=None, check=None):
        return [pipeline._ImageSeg(labels=big.copy(), label_ids=np.array([3, 70000]),
                                   boxes_s=np.zeros((2, 4), np.float32),
                                   scores=np.ones(2, np.float32))]

    monkeypatch.setattr(seg, "_segment_images", fake)
    res = seg.segment(np.ones((50, 60), np.float32))
    assert res.labels.dtype == np.uint32
    np.testing.assert_array_equal(res.labels, big)


def test_timings_and_stage_names(shaped):
    res = Segmenter(shaped[False][0], tile="never").segment(blob_image())
    for stage in ("preprocess", "encoder", "cellfinder", "detect", "decoder", "paste",
                  "postprocess", "table", "total"):
        assert res.timings[stage] >= 0.0
    assert res.timings["total"] >= res.timings["encoder"]


@pytest.mark.parametrize("h,w,n", [(600, 640, 60), (200, 240, 25)])
def test_auto_tiles_small_cells_only(shaped, h, w, n):
    """tile="auto" re-runs tiled when the median cell covers < 0.2 % of the image and the image
    is larger than one tile (only then do tiles show the cells at a finer scale)."""
    model_dir = shaped[False][0]
    img = blob_image(h=h, w=w, n=n)
    whole = Segmenter(model_dir, tile="never").segment(img)
    from cellsam_rt.stages.tiling import (TILE_MEDIAN_AREA_FRACTION, TILE_SIZE,
                                          median_area_fraction)
    frac = median_area_fraction(whole.labels)
    auto = Segmenter(model_dir, tile="auto").segment(img)
    assert auto.tiled == (frac < TILE_MEDIAN_AREA_FRACTION and max(h, w) > TILE_SIZE)
    if not auto.tiled:
        np.testing.assert_array_equal(auto.labels, whole.labels)
    if max(h, w) <= TILE_SIZE:
        assert not auto.tiled  # whatever the cell size: its tiles would add no resolution


def test_chunk_size_does_not_change_labels(shaped):
    model_dir = shaped[True][0]
    img = blob_image(channels=2)
    a = Segmenter(model_dir, tile="never", chunk_size=64).segment(img)
    b = Segmenter(model_dir, tile="never", chunk_size=7).segment(img)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_bad_options_are_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="tile"):
        Segmenter(tiny_model_dir, tile="sometimes")
    with pytest.raises(ValueError):
        Segmenter(tiny_model_dir, chunk_size=0)


def test_prepare_then_segment_equals_segment(shaped):
    """The runner's split: prepare() on a worker thread, segment(prepared=...) after."""
    seg = Segmenter(shaped[True][0], tile="never")
    img = blob_image(channels=2)
    direct = seg.segment(img)
    split = seg.segment(img, prepared=seg.prepare(img))
    np.testing.assert_array_equal(direct.labels, split.labels)
    np.testing.assert_array_equal(direct.scores, split.scores)
    assert direct.n_cells > 5
