"""The scale-aware tile policy (pipeline/native.py, stages/scale.py) with the default model."""
from __future__ import annotations

import numpy as np
import pytest

from cellsam_rt.errors import ModelDirError
from cellsam_rt.pipeline.segmenter import Segmenter
from cellsam_rt.stages import scale as sc
from cellsam_rt.tools.evaluate import match_instances


def planted(size: int, centres, radius: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 image, truth labels): bright discs on a dark noisy background."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, (size, size))
    truth = np.zeros((size, size), np.int32)
    yy, xx = np.ogrid[:size, :size]
    for k, (cy, cx) in enumerate(centres, 1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        image[disc] += 900
        truth[disc] = k
    return np.clip(image, 0, 65535).astype(np.uint16), truth


def test_tile_layout_covers_the_frame_and_cores_partition_it():
    for shape in ((900, 1300), (512, 512), (300, 700), (2096, 2096)):
        layout = sc.tile_layout(shape, 512, 56)
        fh, fw = layout.frame
        owner = np.zeros((fh, fw), np.int32)
        for y, x, (y0, y1, x0, x1) in layout.tiles():
            assert 0 <= y and y + 512 <= fh and 0 <= x and x + 512 <= fw
            yy = np.arange(fh)[:, None] + 0.5
            xx = np.arange(fw)[None, :] + 0.5
            owner += (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
            # the core lies inside the tile, at least half the overlap from a cut edge
            assert max(y0, 0) >= y and min(y1, fh) <= y + 512
        assert (owner == 1).all()
        if fh > 512:
            assert (np.diff(layout.ys) <= 512 - 56).all()  # neighbours overlap >= 56


def test_labels_to_shape_and_rescale():
    labels = np.arange(12, dtype=np.int32).reshape(3, 4)
    up = sc.labels_to_shape(labels, (6, 8))
    np.testing.assert_array_equal(up[::2, ::2], labels)
    np.testing.assert_array_equal(sc.labels_to_shape(up, (3, 4)), labels)
    img = np.zeros((40, 60, 5), np.uint16)
    assert sc.rescale_image(img, 0.5).shape == (20, 30, 5)
    assert sc.rescale_image(img[..., 0], 1.5).shape == (60, 90)
    assert sc.within_tolerance(1.3) and not sc.within_tolerance(0.6)
    assert np.isnan(sc.box_diameter(np.zeros((2, 4))))
    assert sc.box_diameter(np.array([[0, 0, 10, 40]] * 3)) == 20.0


@pytest.fixture(scope="module")
def seg():
    # Discs of 24 px measure 24 px by their detection boxes too: as the model's scale sees them
    # (a given diameter is a disc's, which the default model takes as 1.06 times that in boxes).
    return Segmenter("default", threads=2, diameter=24 / 1.06)


def test_cells_on_tile_seams_come_out_whole(seg):
    # 900 px: 2 x 2 tiles at 0 and 388, cores cut at 450 (in scaled pixels, 469 here); discs on
    # and beside the cuts and on the corner, none touching
    cut = round(450 / (25 / 24))
    centres = [(cut + dy, x) for dy, x in ((0, 60), (-10, 140), (9, 220), (0, 620), (14, 700),
                                            (-13, 800))]
    centres += [(y, cut + dx) for dx, y in ((0, 70), (11, 150), (-8, 300), (0, 650), (12, 800))]
    centres += [(cut, cut), (cut + 60, cut - 60), (300, 300), (650, 300)]
    image, truth = planted(900, centres, 12)
    result = seg.segment(image)
    assert result.tiled and result.scale == pytest.approx(25 / 24)
    m = match_instances(result.labels, truth, 0.5)
    assert m.tp == truth.max() and m.fp == 0, (m.tp, m.fp, truth.max())
    ious = [iou for _, _, iou in m.pairs]
    assert min(ious) >= 0.8 and np.mean(ious) >= 0.9
    # labels are unique, one per cell, and each prompt box lies on its cell
    assert len(result.label_ids) == truth.max() == len(np.unique(result.labels)) - 1
    for lab, box in zip(result.label_ids, result.boxes):
        ys, xs = np.nonzero(result.labels == lab)
        assert box[0] - 4 <= xs.mean() <= box[2] + 4 and box[1] - 4 <= ys.mean() <= box[3] + 4


def test_large_objects_are_measured_and_rescaled():
    # 64-px discs in a 420 px image: the whole-image pass sees them 80 px wide, far from the
    # model's 25, so the image is segmented again at the measured scale
    centres = [(80, 80), (80, 230), (90, 350), (230, 90), (240, 250), (340, 330), (350, 120)]
    image, truth = planted(420, centres, 32)
    result = Segmenter("default", threads=2).segment(image)
    assert result.tiled and result.scale is not None
    true_scale = 25 / 64
    assert abs(result.scale / true_scale - 1) <= 0.25, result.scale
    m = match_instances(result.labels, truth, 0.5)
    # the small default model finds these large, flat discs at this scale, all but a corner one
    # now and then; nothing else is labelled
    assert m.tp >= len(centres) - 1 and m.fp == 0 and m.mean_iou >= 0.85
    # User boxes on the same image are decoded at the scale the segmentation measured, not at
    # the whole-image scale, where the model cannot outline objects this large.
    from cellsam_rt.tools.evaluate import truth_boxes

    prompted = Segmenter("default", threads=2).segment(image, boxes=truth_boxes(truth))
    assert prompted.scale == pytest.approx(result.scale)
    m = match_instances(prompted.labels, truth, 0.5)
    assert m.tp == len(centres) and m.fp == 0 and m.mean_iou >= 0.85


def test_tiles_without_signal_are_skipped(seg):
    image, truth = planted(1400, [(100, 100), (150, 200), (250, 120)], 12)
    calls = []
    run = seg.backend.run

    def counting(graph, inputs):
        calls.append((graph, len(next(iter(inputs.values())))))
        return run(graph, inputs)

    seg.backend.run = counting
    try:
        result = seg.segment(image)
    finally:
        seg.backend.run = run
    encoded = sum(n for g, n in calls if g == "encoder")
    layout = sc.tile_layout(image.shape, 512, sc.overlap_for(25))
    assert len(layout) == 9 and encoded == 1  # only the corner tile holds cells
    assert match_instances(result.labels, truth, 0.5).tp == 3


def test_an_image_no_tile_of_which_clears_the_gate_is_segmented_whole(seg, monkeypatch):
    """A faint, noisy image can look like noise to the tile gate everywhere: it is segmented
    rather than skipped (a low-contrast synthetic image came back with no cells)."""
    image, truth = planted(900, [(100, 100), (150, 200), (250, 120), (700, 700)], 12)
    monkeypatch.setattr(sc, "has_signal", lambda tile, bg, sigmas=sc.SIGNAL_SIGMAS: False)
    result = seg.segment(image)
    assert match_instances(result.labels, truth, 0.5).tp == 4


def test_diameter_needs_a_model_that_states_its_object_diameter(tmp_path):
    import json
    import shutil

    from cellsam_rt.model_dir import DEFAULT_MODEL_DIR

    copy = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("object_diameter")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="states no object_diameter"):
        Segmenter(copy, diameter=20)
    Segmenter(copy, diameter=20, tile="never")  # the reference's paths ignore it
    with pytest.raises(ValueError, match="diameter must be a positive"):
        Segmenter("default", diameter=0)


def test_diameters_are_given_and_reported_as_discs_of_the_cells_area(tmp_path, seg):
    """The scale policy measures detection boxes, sqrt(w * h); the manifest's
    box_diameter_ratio converts a user's diameter to that, and the estimate back."""
    import json
    import shutil

    from cellsam_rt.model_dir import DEFAULT_MODEL_DIR

    copy = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["box_diameter_ratio"] == 1.06
    manifest.pop("box_diameter_ratio")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    boxes = Segmenter(copy, threads=2, diameter=30)
    discs = Segmenter("default", threads=2, diameter=30)
    assert boxes.box_diameter == 30 and discs.box_diameter == pytest.approx(31.8)
    image, _ = planted(700, [(100 + 120 * i, 100 + 120 * j) for i in range(5) for j in range(5)],
                       12)
    as_boxes = Segmenter(copy, threads=2).estimate_diameter(image)
    assert seg.estimate_diameter(image) == pytest.approx(as_boxes / 1.06)
    manifest["box_diameter_ratio"] = 3
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="box_diameter_ratio must be"):
        Segmenter(copy)


def test_diameter_options_in_pixels_or_micrometres():
    import argparse

    from cellsam_rt.cli.options import add_model_options, add_segmenter_options, segmenter_kwargs
    from cellsam_rt.errors import OptionError

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    add_segmenter_options(parser)
    kw = segmenter_kwargs(parser.parse_args(["--diameter", "30"]))
    assert kw["diameter"] == 30 and kw["decoder"] == "auto" and kw["tile"] == "auto"
    kw = segmenter_kwargs(parser.parse_args(["--diameter", "6", "--pixel-size", "0.25"]))
    assert kw["diameter"] == 24
    assert "diameter" not in segmenter_kwargs(parser.parse_args([]))
    with pytest.raises(OptionError, match="--pixel-size needs --diameter"):
        segmenter_kwargs(parser.parse_args(["--pixel-size", "0.25"]))


def test_estimate_diameter_of_discs(seg):
    # 24-px discs, in a 512 px image (the whole-image look) and in a 200 px one (probes)
    image, truth = planted(512, [(y, x) for y in (60, 180, 300, 420) for x in (80, 250, 420)], 12)
    assert abs(seg.estimate_diameter(image) / 24 - 1) <= 0.25
    small, _ = planted(200, [(50, 50), (50, 150), (150, 60), (140, 150)], 12)
    assert abs(seg.estimate_diameter(small) / 24 - 1) <= 0.25
    assert np.isnan(seg.estimate_diameter(np.full((300, 300), 100, np.uint16)))


def test_scale_search_keeps_the_more_confident_of_two_plausible_scales(monkeypatch):
    # An image of small nuclei in clusters: at scale 1 the detector sees clusters at the model's
    # size (a fixed point, unsure); at scale 2 the nuclei themselves (a fixed point, sure).
    from types import SimpleNamespace

    from cellsam_rt.pipeline import native

    def probe(seg, image, channels, scale):
        if 0.8 <= scale <= 1.25:
            return 25.0 * scale, 0.8           # clusters
        if 1.6 <= scale <= 2.5:
            return 12.5 * scale, 2.5           # nuclei
        return float("nan"), 0.0

    seg = SimpleNamespace(model_dir=SimpleNamespace(object_diameter=25.0))
    monkeypatch.setattr(native, "detect_diameter", probe)
    assert native.estimate_scale(seg, None, None, 1.0, snap=False) == pytest.approx(2.0)
    # Starts that end near the first one's scale read the image alike: the first one stays.
    monkeypatch.setattr(native, "detect_diameter", lambda seg, image, channels, scale: (
        (25.0 * scale / 1.1, 1.0) if scale < 1.5 else (25.0 * scale / 1.2, 1.2)))
    assert native.estimate_scale(seg, None, None, 1.0, snap=False) == pytest.approx(1.1)
    monkeypatch.setattr(native, "detect_diameter", lambda *a: (float("nan"), 0.0))
    assert np.isnan(native.estimate_scale(seg, None, None, 1.0, snap=False))
    assert native.estimate_scale(seg, None, None, 1.1) == 1.0  # nothing measured: as it comes
