"""The PyTorch reference pipeline (docs/design.md §2): stage functions on known answers, tiny model end to end."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from cellsam_export import reference as R  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------- 2.1 channels


def test_format_2d_goes_to_last_slot():
    img = np.arange(20, dtype=np.uint16).reshape(4, 5)
    out = R.format_image_shape(img)
    assert out.shape == (4, 5, 3) and out.dtype == np.float64
    assert np.array_equal(out[..., 2], img)
    assert not out[..., :2].any()


def test_format_hw2_fills_slots_1_and_2_in_order():
    img = np.stack([np.full((6, 7), 1.0), np.full((6, 7), 2.0)], axis=-1)
    out = R.format_image_shape(img)
    assert not out[..., 0].any()
    assert (out[..., 1] == 1).all() and (out[..., 2] == 2).all()


def test_format_channels_first_is_detected_as_smallest_axis():
    img = np.stack([np.full((6, 7), 1.0), np.full((6, 7), 2.0)], axis=0)  # 2xHxW
    out = R.format_image_shape(img)
    assert out.shape == (6, 7, 3)
    assert not out[..., 0].any()
    assert (out[..., 1] == 1).all() and (out[..., 2] == 2).all()


def test_format_rejects_too_many_channels_and_dims():
    with pytest.raises(ValueError):
        R.format_image_shape(np.zeros((10, 10, 4)))
    with pytest.raises(ValueError):
        R.format_image_shape(np.zeros((2, 10, 10, 1)))


# ---------------------------------------------------------------- 2.2 normalisation


def test_percentile_clip_uses_nonzero_values_per_channel():
    img = np.zeros((40, 50, 3))
    values = np.arange(1, 1001, dtype=np.float64)
    img[:20, :, 2] = values.reshape(20, 50)  # half the pixels stay 0
    img[:, :, 1] = 7.0
    out = R.percentile_clip(img)
    # 99.9th percentile (linear) of 1..1000 is 1 + 0.999 * 999, zeros do not count.
    assert out[..., 2].max() == pytest.approx(1 + 0.999 * 999)
    assert (out[:20, :, 2].ravel()[:999] == values[:999]).all()
    assert not out[20:, :, 2].any()
    assert (out[..., 1] == 7.0).all()  # constant non-zero channel: its percentile is itself
    assert not out[..., 0].any()


def test_normalize_constant_channel_becomes_zero_and_others_span_0_1():
    rng = np.random.default_rng(0)
    img = R.format_image_shape(np.stack([np.full((64, 80), 5.0), rng.random((64, 80)) * 300], axis=-1))
    out = R.normalize_image(img)
    assert out.shape == (64, 80, 3) and out.dtype == np.float64
    assert not out[..., 0].any() and not out[..., 1].any()  # blank slot and constant channel
    assert out[..., 2].min() == 0.0 and out[..., 2].max() == 1.0


# ---------------------------------------------------------------- 2.3 resize


def test_resize_is_antialiased_bilinear():
    yy, xx = np.mgrid[:300, :200]
    img = np.repeat(((yy + xx) % 2).astype(np.float64)[..., None], 3, axis=-1)  # checkerboard
    out = R.resize_to_model(img, 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    x = torch.from_numpy(img.transpose(2, 0, 1).copy()).float()[None]
    direct = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.equal(out, direct)
    plain = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=False)[0]
    # Antialiasing averages the checkerboard to ~0.5; plain bilinear aliases.
    assert (out - 0.5).abs().max() < 0.05 and (plain - 0.5).abs().max() > 0.2


def test_resize_same_size_is_identity():
    img = np.random.default_rng(1).random((32, 32, 3))
    assert torch.equal(R.resize_to_model(img, 32), torch.from_numpy(img.transpose(2, 0, 1)).float())


# ---------------------------------------------------------------- 2.4 SAM branch


def test_sam_rescale_lower_bound_is_min_nonzero():
    x = torch.zeros(3, 20, 20)
    x[2, :10] = torch.linspace(0.2, 0.8, 200).reshape(10, 20)
    out = R.sam_percentile_rescale(x)
    nonzero = x[x != 0].numpy()
    high = np.percentile(nonzero, 99.5)
    assert out.dtype == torch.float32
    assert out[2, 0, 0] == 0.0  # the smallest non-zero value maps to 0, not 0.2
    assert out.max() == 1.0 and not out[:2].any() and not out[2, 10:].any()
    expected = np.clip((x[2, 5, 7].item() - 0.2) / (high - 0.2), 0, 1)
    assert out[2, 5, 7].item() == pytest.approx(expected, rel=1e-5)


def test_sam_rescale_all_zero_passes_through():
    out = R.sam_percentile_rescale(torch.zeros(3, 8, 8))
    assert out.shape == (3, 8, 8) and not out.any()


def test_sam_branch_input_imagenet_normalisation():
    x = torch.zeros(3, 16, 16)
    x[2, :8] = 0.5
    x[2, 8:] = 1.0
    out = R.sam_branch_input(x, has_model_cp=False)
    assert out.shape == (1, 3, 16, 16)
    # After the percentile step channel 2 is 0 (min non-zero) / 1 (99.5th pct); channels 0,1 stay 0.
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, rel=1e-6)
    assert out[0, 2, 0, 0].item() == pytest.approx(-0.406 / 0.225, rel=1e-6)
    assert out[0, 2, 15, 0].item() == pytest.approx((1 - 0.406) / 0.225, rel=1e-6)


def test_min_max_per_channel_matches_kornia_formula():
    x = torch.tensor([[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]], [[-1.0, 0.0], [1.0, 0.0]]])
    out = R.min_max_per_channel(x)
    assert torch.allclose(out[0], (x[0] - 1) / (8 + 1e-6))
    assert not out[1].any()  # constant channel -> exactly 0
    assert out[2].min() == 0.0 and out[2].max() < 1.0  # eps keeps the max just under 1


def test_sam_branch_model_cp_min_max_then_imagenet():
    x = torch.zeros(3, 16, 16)
    x[2] = torch.linspace(0.1, 1.0, 256).reshape(16, 16)
    out = R.sam_branch_input(x, has_model_cp=True)
    # Blank channel: constant after ImageNet normalisation -> min-max 0 -> (0 - 0.485) / 0.229.
    assert torch.allclose(out[0, 0], torch.full((16, 16), -0.485 / 0.229))
    assert out[0, 2].min().item() == pytest.approx(-0.406 / 0.225, rel=1e-5)
    assert out[0, 2].max().item() == pytest.approx((1 - 0.406) / 0.225, rel=1e-4)


# ---------------------------------------------------------------- 2.5 CellFinder branch


def test_cellfinder_input_truncates_to_uint8():
    x = torch.zeros(3, 2, 2)
    x[2] = torch.tensor([[0.5, 0.999], [1.0, 0.0]])
    u8 = R.to_uint8_truncated(x)
    assert u8.dtype == torch.uint8
    assert u8[2].tolist() == [[127, 254], [255, 0]]  # 127.5 -> 127, 254.745 -> 254
    out = R.cellfinder_branch_input(x, has_model_cp=False)
    assert out.shape == (1, 3, 2, 2)
    assert out[0, 2, 0, 0].item() == pytest.approx((127 - 103.53) / 57.375, rel=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(-123.675 / 58.395, rel=1e-6)


def test_cellfinder_model_cp_copies_channel_2_into_empty_channel_1():
    x = torch.zeros(3, 8, 8)
    x[2] = torch.linspace(0, 1, 64).reshape(8, 8)
    out = R.cellfinder_branch_input(x, has_model_cp=True)[0]
    assert torch.equal(out[1], out[2])
    assert not out[0].any()
    assert out[2].min() == 0.0 and out[2].max() == pytest.approx(1.0, abs=1e-5)
    y = torch.zeros(3, 8, 8)
    y[1] = x[2]  # channel 2 empty -> gets channel 1
    out = R.to_rgb_channels(R.min_max_per_channel(y))
    assert torch.equal(out[1], out[2]) and out[2].max() > 0


# ---------------------------------------------------------------- 2.6 detection


def _logit(p):
    return float(np.log(p / (1 - p)))


def test_detect_topk_pairs_threshold_and_unclipped_boxes():
    q = 8
    logits = torch.full((q, 2), _logit(0.1))
    logits[3, 1] = _logit(0.9)
    logits[5, 0] = _logit(0.9)
    logits[5, 1] = _logit(0.9)  # both classes of one query: the same box twice
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * q)
    boxes[3] = torch.tensor([0.25, 0.5, 0.1, 0.2])
    boxes[5] = torch.tensor([0.95, 0.1, 0.3, 0.4])  # reaches past the right and top edges
    out_boxes, scores = R.detect(logits, boxes, 128)
    assert len(scores) == 3
    np.testing.assert_allclose(scores, 0.9, rtol=1e-6)
    expected = np.array([[25.6, 51.2, 38.4, 76.8], [102.4, -12.8, 140.8, 38.4], [102.4, -12.8, 140.8, 38.4]])
    np.testing.assert_allclose(out_boxes[np.argsort(out_boxes[:, 0])], expected, rtol=1e-5)
    assert out_boxes[:, 2].max() > 128 and out_boxes[:, 1].min() < 0
    # k = Q (8) of the 16 (query, class) pairs: 3 high scores + 5 low ones.
    all_boxes, all_scores = R.decode_detections(logits, boxes, 128)
    assert all_boxes.shape == (8, 4) and np.all(np.diff(all_scores) <= 0)
    # Two clusters with centres 0.9 and 0.1 -> 0.66 * 0.4 + 0.33 * 0.5.
    thr = R.detection_threshold(all_scores, 0.4)
    assert thr == pytest.approx(0.66 * 0.4 + 0.33 * 0.5, rel=1e-5)


def test_detection_threshold_falls_back_for_a_single_score():
    assert R.detection_threshold(np.array([0.7], np.float32), 0.4) == 0.4
    boxes, scores = R.detect(torch.tensor([[_logit(0.3), _logit(0.45)]]), torch.rand(1, 4), 64)
    assert len(scores) == 1 and scores[0] == pytest.approx(0.45, rel=1e-6)  # k = Q = 1, 0.45 > 0.4


def test_scale_user_boxes_per_axis():
    out = R.scale_user_boxes([[10, 20, 50, 60]], (100, 200), 256)
    np.testing.assert_allclose(out, [[12.8, 51.2, 64.0, 153.6]], rtol=1e-6)
    assert out.dtype == np.float32 and R.scale_user_boxes([], (100, 200), 256).shape == (0, 4)


# ---------------------------------------------------------------- 2.7-2.8 masks, merge, postprocess


def test_upsample_goes_through_model_size():
    low = torch.randn(2, 1, 16, 16)
    out = R.upsample_mask_logits(low, 64, (30, 50))
    mid = F.interpolate(low, (64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(out, F.interpolate(mid, (30, 50), mode="bilinear", align_corners=False))


def test_merge_later_mask_wins():
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[0, :2] = 1
    masks[1, 1:3] = 1
    masks[2, 3, 3] = 1
    out = R.merge_masks(masks)
    assert out.dtype == np.int64
    assert out[0].tolist() == [1, 1, 1, 1]
    assert out[1].tolist() == [2, 2, 2, 2] and out[2].tolist() == [2, 2, 2, 2]
    assert out[3].tolist() == [0, 0, 0, 3]
    empty = R.merge_masks(np.zeros((0, 5, 6), np.uint8))
    assert empty.shape == (5, 6) and empty.dtype == np.int64 and not empty.any()


def _ring(labels, value, top, left, size, width=2):
    labels[top:top + size, left:left + size] = value
    labels[top + width:top + size - width, left + width:left + size - width] = 0


def test_fill_holes_overwrites_a_later_label_inside_the_hole():
    labels = np.zeros((30, 30), np.int64)
    _ring(labels, 1, 2, 2, 20)
    labels[8:14, 8:14] = 2  # inside label 1's hole
    out = R.fill_holes_and_remove_small_masks(labels)
    assert out is labels  # in place, as the reference
    assert set(np.unique(out)) == {0, 1}
    assert (out[2:22, 2:22] == 1).all()


def test_fill_holes_overwrites_an_earlier_label_leaving_a_gap():
    labels = np.zeros((30, 30), np.int64)
    _ring(labels, 2, 2, 2, 20)
    labels[8:14, 8:14] = 1  # processed first, kept as 1; then label 2 fills its hole over it
    out = R.fill_holes_and_remove_small_masks(labels)
    assert set(np.unique(out)) == {0, 2}  # numbering is left non-contiguous


def test_fill_holes_removes_small_and_renumbers():
    labels = np.zeros((40, 40), np.int64)
    labels[0:4, 0:6] = 1  # 24 px < 25: removed
    labels[10:15, 10:15] = 3  # 25 px: kept, becomes 1
    labels[20:30, 20:30] = 5  # kept, becomes 2
    out = R.fill_holes_and_remove_small_masks(labels, min_size=25)
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out[10:15, 10:15] == 1).all() and (out[20:30, 20:30] == 2).all()
    assert not out[0:4, 0:6].any()


# ---------------------------------------------------------------- end to end on the tiny model


def _tiny_model(with_model_cp=False, confident=True):
    build = pytest.importorskip("cellsam_export.build")
    torch.manual_seed(0)
    model = build.build_cellsam("tiny", with_model_cp=with_model_cp).eval()
    if confident:
        # Random IoU heads predict < 0.5 and every mask would be dropped: force IoU = 1.
        for sam in (model.model, model.model_cp):
            if sam is not None:
                last = sam.mask_decoder.iou_prediction_head.layers[-1]
                torch.nn.init.zeros_(last.weight)
                torch.nn.init.constant_(last.bias, 1.0)
    return model


def _two_channel_image():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:90, :120]
    cells = np.zeros((90, 120))
    for cy, cx in [(20, 30), (60, 90), (45, 55)]:
        cells[(yy - cy) ** 2 + (xx - cx) ** 2 < 120] = 1.0
    nuclear = cells * 200 + rng.random((90, 120)) * 10
    whole = cells * 150 + rng.random((90, 120)) * 30
    return np.stack([nuclear, whole], axis=-1)


@pytest.fixture(scope="module")
def tiny_pipeline():
    return R.ReferencePipeline(_tiny_model())


def test_end_to_end_tiny_is_finite_and_deterministic(tiny_pipeline):
    img = _two_channel_image()
    a = tiny_pipeline.segment(img)
    b = tiny_pipeline.segment(img)
    assert a.labels.shape == (90, 120) and a.labels.dtype == np.int64
    assert a.embeddings.shape == (1, 64, 16, 16) and np.isfinite(a.embeddings).all()
    assert a.boxes.shape[1] == 4 and len(a.boxes) == len(a.scores) > 0
    assert np.all(a.scores > a.threshold)
    assert a.num_masks == len(a.boxes)  # IoU forced to 1: nothing dropped
    assert a.labels.any()
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.boxes, b.boxes)
    assert {"encoder", "cellfinder", "masks", "total"} <= set(a.timings)


def test_end_to_end_equals_composed_stages(tiny_pipeline):
    img = _two_channel_image()
    result = tiny_pipeline.segment(img)
    model, size = tiny_pipeline.model, tiny_pipeline.size
    resized = R.resize_to_model(R.normalize_image(R.format_image_shape(img)), size)
    with torch.no_grad():
        emb = model.sam.image_encoder(R.sam_branch_input(resized, False))
        logits, boxes = model.cellfinder(R.cellfinder_branch_input(resized, False))
    det_boxes, det_scores = R.detect(logits[0], boxes[0], size)
    assert np.array_equal(det_boxes, result.boxes) and np.array_equal(det_scores, result.scores)
    assert np.array_equal(emb.numpy(), result.embeddings)
    masks, _, kept = R.decode_masks_per_box(model, emb, det_boxes, img.shape[:2])
    labels = R.fill_holes_and_remove_small_masks(R.merge_masks(masks))
    assert np.array_equal(labels, result.labels) and np.array_equal(kept, result.kept)


def test_iou_filter_keeps_exactly_0_5_and_drops_below():
    model = _tiny_model(confident=False)
    last = model.model.mask_decoder.iou_prediction_head.layers[-1]
    torch.nn.init.zeros_(last.weight)
    emb = torch.randn(1, 64, 16, 16)
    boxes = np.array([[10, 10, 100, 100], [50, 60, 200, 220]], np.float32)
    last.bias.data.fill_(0.5)  # the reference drops only iou < 0.5
    masks, scores, kept = R.decode_masks_per_box(model, emb, boxes, (40, 30))
    assert masks.shape == (2, 40, 30) and masks.dtype == np.uint8
    assert kept.tolist() == [0, 1] and np.allclose(scores, 0.5)
    low_res, iou = R.decode_low_res_masks(model, emb, boxes)
    assert low_res.shape == (2, 1, 64, 64) and np.allclose(iou, 0.5)
    full = R.upsample_mask_logits(torch.from_numpy(low_res), 256, (40, 30))
    assert np.array_equal(masks, (torch.sigmoid(full[:, 0]) > 0.4).numpy().astype(np.uint8))
    last.bias.data.fill_(0.4999)
    masks, scores, kept = R.decode_masks_per_box(model, emb, boxes, (40, 30))
    assert masks.shape == (0, 40, 30) and len(scores) == 0 and len(kept) == 0


def test_load_reference_from_checkpoint(tmp_path):
    ckpt = pytest.importorskip("cellsam_export.checkpoint")
    path = ckpt.save_checkpoint(tmp_path / "tiny.pt", ckpt.random_state_dict("tiny", with_model_cp=True),
                                config="tiny")
    pipe = R.load_reference(path)
    assert pipe.size == 256 and pipe.has_model_cp


def test_zero_image_does_not_crash(tiny_pipeline):
    # The reference crashes in PercentileThreshold here; ours passes the blank image on. With
    # random weights forced confident the detector still "finds" boxes on it, so only shape/dtype.
    result = tiny_pipeline.segment(np.zeros((50, 70)))
    assert result.labels.shape == (50, 70) and result.labels.dtype == np.int64
    assert np.isfinite(result.embeddings).all()


def test_zero_image_gives_zero_labels():
    pipe = R.ReferencePipeline(_tiny_model(confident=False))
    pipe.model.model.mask_decoder.iou_prediction_head.layers[-1].bias.data.fill_(-10.0)  # no mask passes
    result = pipe.segment(np.zeros((50, 70)))
    assert result.num_masks == 0
    assert result.labels.shape == (50, 70) and result.labels.dtype == np.int64
    assert not result.labels.any()


def test_no_kept_masks_gives_zero_labels():
    pipe = R.ReferencePipeline(_tiny_model(confident=False))
    pipe.model.model.mask_decoder.iou_prediction_head.layers[-1].bias.data.fill_(-10.0)
    result = pipe.segment(_two_channel_image())
    assert result.num_masks == 0 and not result.labels.any() and result.labels.dtype == np.int64


def test_user_boxes_are_scaled_and_used(tiny_pipeline):
    img = _two_channel_image()
    result = tiny_pipeline.segment(img, boxes=[[10, 5, 50, 40], [70, 40, 110, 80]])
    np.testing.assert_allclose(result.boxes, [[10 * 256 / 120, 5 * 256 / 90, 50 * 256 / 120, 40 * 256 / 90],
                                              [70 * 256 / 120, 40 * 256 / 90, 110 * 256 / 120, 80 * 256 / 90]],
                               rtol=1e-6)
    assert np.isnan(result.scores).all() and result.threshold is None
    assert result.num_masks == 2 and result.labels.any()
    empty = tiny_pipeline.segment(img, boxes=[])
    assert empty.num_masks == 0 and not empty.labels.any()


def test_model_cp_pipeline_runs():
    pipe = R.ReferencePipeline(_tiny_model(with_model_cp=True))
    assert pipe.has_model_cp
    result = pipe.segment(_two_channel_image())
    assert result.labels.dtype == np.int64 and np.isfinite(result.embeddings).all()
