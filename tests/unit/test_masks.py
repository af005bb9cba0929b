"""Mask decoding in chunks and ROI mask upsampling (docs/design.md §2.7-2.8)."""
from __future__ import annotations

import numpy as np
import pytest

from cellsam_rt.stages.masks import decode_masks, full_frame_masks, paste_masks, upsample_matrix


def _blob_logits(k, m, seed):
    """Low-res logits: negative background, blobs anywhere (edges included), some noisy masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:m, :m]
    out = np.empty((k, m, m), np.float32)
    for i in range(k):
        lg = rng.normal(-8, 1, (m, m))
        kind = i % 4
        for _ in range(int(rng.integers(1, 4))):
            if kind == 1:  # on the frame edge / corner
                cy, cx = rng.choice([0, m - 1]), rng.uniform(-2, m + 2)
            else:
                cy, cx = rng.uniform(-2, m + 2), rng.uniform(-2, m + 2)
            r = rng.uniform(1, m / 5)
            lg += rng.uniform(6, 14) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        if kind == 2:  # speckle: isolated pixels right around the threshold
            lg[rng.random((m, m)) < 0.01] = rng.normal(-0.4, 0.3)
        if kind == 3 and i % 8 == 3:
            lg[:] = -5  # nothing passes
        out[i] = lg
    return out


def _merged_full_frame(logits, labels, S, h, w, thr=0.4):
    full = full_frame_masks(logits, S, h, w, thr)
    return np.max(full * labels[:, None, None].astype(np.uint32), axis=0, initial=0)


@pytest.mark.parametrize("m,S,h,w", [(16, 64, 150, 97), (16, 64, 40, 23), (16, 64, 64, 64),
                                     (16, 64, 17, 200), (32, 128, 300, 260), (16, 64, 1, 5)])
def test_roi_paste_equals_full_frame(m, S, h, w):
    logits = _blob_logits(24, m, seed=m + h + w)
    labels = np.arange(1, 25, dtype=np.uint32)
    out = np.zeros((h, w), np.uint32)
    paste_masks(out, logits, labels, S)
    expected = _merged_full_frame(logits, labels, S, h, w)
    np.testing.assert_array_equal(out, expected)
    assert (out > 0).any()


def test_roi_paste_threshold_and_4d_input():
    logits = _blob_logits(10, 16, seed=5)
    for thr in (0.1, 0.5, 0.9):
        out = np.zeros((70, 45), np.uint32)
        paste_masks(out, logits[:, None], np.arange(1, 11), 64, mask_threshold=thr)
        np.testing.assert_array_equal(out, _merged_full_frame(logits, np.arange(1, 11), 64, 70, 45, thr))


def test_paste_order_and_chunking_do_not_matter():
    logits = _blob_logits(30, 16, seed=9)
    labels = np.arange(1, 31, dtype=np.uint32)
    whole = paste_masks(np.zeros((90, 120), np.uint32), logits, labels, 64)
    parts = np.zeros((90, 120), np.uint32)
    for idx in (np.arange(20, 30), np.arange(0, 7), np.arange(7, 20)):  # any order: max rule
        paste_masks(parts, logits[idx], labels[idx], 64)
    np.testing.assert_array_equal(whole, parts)


def test_masks_are_not_confined_to_boxes():
    # A mask whose only positive logits are in the far corner is pasted there: no box is used.
    logits = np.full((1, 16, 16), -10, np.float32)
    logits[0, 15, 15] = 5
    out = paste_masks(np.zeros((100, 100), np.uint16), logits, [3], 64)
    rows, cols = np.nonzero(out)
    assert rows.size and rows.min() > 80 and cols.min() > 80 and set(np.unique(out)) == {0, 3}


def test_upsample_matrix_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for m, S, out in [(16, 64, 150), (16, 64, 23), (64, 256, 256), (256, 1024, 999), (16, 64, 1)]:
        a = upsample_matrix(m, S, out)
        eye = torch.eye(m, dtype=torch.float64)[None, None]  # rows are unit impulses
        t = F.interpolate(eye, size=(m, S), mode="bilinear", align_corners=False)
        t = F.interpolate(t, size=(m, out), mode="bilinear", align_corners=False)[0, 0].numpy()
        assert a.shape == (out, m)
        assert np.abs(a - t.T).max() <= 1e-12
        np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
        assert (a >= 0).all()


def test_full_frame_masks_match_reference_upsampling():
    torch = pytest.importorskip("torch")
    R = pytest.importorskip("cellsam_export.reference")
    total = mismatched = 0
    for m, S, h, w in [(16, 64, 150, 97), (64, 256, 200, 300), (64, 256, 100, 37)]:
        logits = _blob_logits(12, m, seed=h)
        ours = full_frame_masks(logits, S, h, w)
        up = R.upsample_mask_logits(torch.from_numpy(logits)[:, None], S, (h, w))
        ref = (torch.sigmoid(up[:, 0]) > R.MASK_THRESHOLD).numpy()
        total += ref.size
        mismatched += int((ours != ref).sum())
    # The reference interpolates twice in float32; we apply the exact composite map (float64)
    # and round once, so pixels whose logit sits within float32 noise of the cut may differ.
    assert mismatched <= total * 1e-5


class _FakeDecoder:
    """Test double for the ONNX decoder: deterministic logits from the gathered embedding and box."""

    def __init__(self, m, steep=80.0, size=64):
        self.m = m
        self.steep = steep  # how fast the logits fall off away from the box centre
        self.size = size  # the model input side the boxes are in
        self.calls = []

    def __call__(self, graph, feeds):
        assert graph == "decoder"
        emb, boxes, box_image = feeds["embeddings"], feeds["boxes"], feeds["box_image"]
        assert box_image.dtype == np.int64 and boxes.dtype == np.float32
        assert box_image.max() < emb.shape[0]
        self.calls.append((boxes.shape[0], emb.shape[0]))
        level = emb[box_image].mean(axis=(1, 2, 3))  # which image a box was gathered from
        yy, xx = np.mgrid[:self.m, :self.m] / self.m
        cx = (boxes[:, 0] + boxes[:, 2]) / 2 / self.size
        cy = (boxes[:, 1] + boxes[:, 3]) / 2 / self.size
        logits = 6 - self.steep * ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)
        logits = logits + level[:, None, None]
        iou = (np.sin(boxes.sum(axis=1) * 12.9898) * 0.5 + 0.5).astype(np.float32)
        return {"mask_logits": logits[:, None].astype(np.float32), "iou": iou[:, None]}


def _decode_inputs(n=53, t=4, seed=0):
    rng = np.random.default_rng(seed)
    emb = np.stack([np.full((8, 4, 4), float(i)) for i in range(t)]).astype(np.float32)
    xy = rng.uniform(-5, 70, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 20, (n, 2))], 1).astype(np.float32)
    box_image = rng.integers(0, t, n)
    box_image[:10] = 2  # a run that uses one embedding only
    return emb, boxes, box_image


def _collect(run, emb, boxes, box_image, chunk):
    idx, logits, iou = [], [], []
    for i, lg, io in decode_masks(run, emb, boxes, box_image, chunk_size=chunk):
        assert lg.shape[0] == i.size == io.size
        idx.append(i)
        logits.append(lg)
        iou.append(io)
    return np.concatenate(idx), np.concatenate(logits), np.concatenate(iou)


def test_decode_masks_chunking_is_invariant():
    emb, boxes, box_image = _decode_inputs()
    results = {}
    for chunk in (1, 7, 1000):
        run = _FakeDecoder(16)
        results[chunk] = _collect(run, emb, boxes, box_image, chunk)
        assert max(c[0] for c in run.calls) <= chunk
        assert len(run.calls) == -(-len(boxes) // chunk)
        if chunk == 1:  # only the one embedding a box needs travels with it
            assert all(c[1] == 1 for c in run.calls)
    for chunk in (7, 1000):
        for a, b in zip(results[1], results[chunk]):
            np.testing.assert_array_equal(a, b)
    # What survives is exactly the boxes with iou >= 0.5, in box order, with their own image.
    full = _FakeDecoder(16)("decoder", {"embeddings": emb, "boxes": boxes,
                                         "box_image": box_image.astype(np.int64)})
    keep = np.flatnonzero(full["iou"][:, 0] >= 0.5)
    idx, logits, iou = results[7]
    np.testing.assert_array_equal(idx, keep)
    np.testing.assert_array_equal(logits, full["mask_logits"][keep, 0])
    assert 0 < keep.size < len(boxes)


def test_decode_and_paste_stream_gives_same_labels_for_any_chunk_size():
    emb, boxes, box_image = _decode_inputs(seed=1)
    labels = {}
    for chunk in (1, 7, 1000):
        out = np.zeros((90, 70), np.uint32)
        next_label = 1
        for idx, logits, _ in decode_masks(_FakeDecoder(16), emb, boxes, box_image, chunk_size=chunk):
            paste_masks(out, logits, np.arange(next_label, next_label + idx.size), 64)
            next_label += idx.size
        labels[chunk] = out
    np.testing.assert_array_equal(labels[1], labels[7])
    np.testing.assert_array_equal(labels[1], labels[1000])
    assert len(np.unique(labels[1])) > 3


def test_decode_masks_edge_cases():
    emb, boxes, box_image = _decode_inputs()
    assert list(decode_masks(_FakeDecoder(16), emb, boxes[:0], box_image[:0])) == []
    with pytest.raises(ValueError, match="box_image"):
        list(decode_masks(_FakeDecoder(16), emb, boxes, box_image + 10))
    with pytest.raises(ValueError, match="chunk_size"):
        list(decode_masks(_FakeDecoder(16), emb, boxes, box_image, chunk_size=0))


class _FakeWindowDecoder(_FakeDecoder):
    """The fake decoder plus a windowed graph whose logits are the full ones' window crop."""

    def __call__(self, graph, feeds):
        if graph == "decoder":
            return super().__call__("decoder", feeds)
        assert graph == "decoder_window"
        grid = feeds["embeddings"].shape[-1]
        cells, origin = feeds["cells"], feeds["origin"]
        side = cells.shape[0]
        np.testing.assert_array_equal(cells, np.arange(side)[:, None] * grid + np.arange(side))
        assert origin.min() >= 0 and origin.max() <= grid - side
        out = super().__call__("decoder", feeds)
        crops = [lg[:, 4 * r:4 * (r + side), 4 * c:4 * (c + side)]
                 for lg, (r, c) in zip(out["mask_logits"], origin)]
        block = side
        if "paste" in feeds:  # the pasted block inside each window
            block = feeds["paste_cells"].shape[0]
            np.testing.assert_array_equal(feeds["paste_cells"],
                                          np.arange(block)[:, None] * side + np.arange(block))
            assert feeds["paste"].min() >= 0 and feeds["paste"].max() <= side - block
            crops = [lg[:, 4 * r:4 * (r + block), 4 * c:4 * (c + block)]
                     for lg, (r, c) in zip(crops, feeds["paste"])]
        self.calls.append(("window", feeds["boxes"].shape[0], side) + ((block,) if block < side else ()))
        return {"mask_logits": np.stack(crops), "iou": out["iou"]}


def test_window_sides_and_origins():
    from cellsam_rt.stages.masks import window_origins, window_sides

    policy = {"min": 16, "max": 48, "box_factor": 4}
    # 512-px model input, 64-token grid: 8 px per token
    boxes = np.array([[100, 100, 124, 120],      # 3 tokens -> 12 -> min 16
                      [0, 0, 60, 30],            # 7.5 tokens -> 30 -> 32 (step 8)
                      [200, 200, 296, 260],      # 12 tokens -> 48
                      [10, 10, 130, 20],         # 15 tokens -> 60 > max: full frame
                      [500, 500, 512, 512]], np.float32)
    sides = window_sides(boxes, 512, 64, policy)
    np.testing.assert_array_equal(sides, [16, 32, 48, 0, 16])
    origins = window_origins(boxes, sides, 512, 64)
    np.testing.assert_array_equal(origins[0], [6, 6])      # centred on token 13.75
    np.testing.assert_array_equal(origins[1], [0, 0])      # clamped at the top-left
    np.testing.assert_array_equal(origins[4], [48, 48])    # clamped at the bottom-right
    assert (origins + sides[:, None] <= 64).all()


def test_decode_masks_with_windows_keeps_box_order_and_places_each_window():
    from cellsam_rt.stages.masks import OUTSIDE_WINDOW, window_origins, window_sides

    emb, boxes, box_image = _decode_inputs(seed=2)
    emb = np.repeat(np.repeat(emb, 8, axis=2), 8, axis=3)  # a 32-token grid, 128-px input
    policy = {"min": 8, "max": 16, "box_factor": 4}
    sides = window_sides(boxes, 128, 32, policy)
    assert (sides == 0).any() and (sides > 0).any()
    run = _FakeWindowDecoder(128)
    got = list(decode_masks(run, emb, boxes, box_image, chunk_size=5, window=policy, size=128))
    full = _FakeDecoder(128)("decoder", {"embeddings": emb, "boxes": boxes,
                                          "box_image": box_image.astype(np.int64)})
    idx = np.concatenate([g[0] for g in got])
    keep = np.flatnonzero(full["iou"][:, 0] >= 0.5)
    np.testing.assert_array_equal(idx, keep)  # the same boxes survive, in box order
    origins = window_origins(boxes, sides, 128, 32)
    for i, logits in zip(idx, np.concatenate([g[1] for g in got])):
        ref = full["mask_logits"][i, 0]
        if sides[i] == 0:
            np.testing.assert_array_equal(logits, ref)
            continue
        r, c, s = 4 * origins[i, 0], 4 * origins[i, 1], 4 * sides[i]
        np.testing.assert_array_equal(logits[r:r + s, c:c + s], ref[r:r + s, c:c + s])
        outside = np.ones_like(logits, dtype=bool)
        outside[r:r + s, c:c + s] = False
        assert (logits[outside] == OUTSIDE_WINDOW).all()
    # windows go in calls grouped by side, each holding the tokens of about 5 full-frame boxes
    window_calls = [c for c in run.calls if c[0] == "window"]
    for side in np.unique(sides[sides > 0]):
        per_call = max(5, 5 * 32 * 32 // (side * side))
        counts = [n for _, n, s in window_calls if s == side]
        assert sum(counts) == (sides == side).sum() and max(counts) <= per_call
        assert len(counts) == -(-(sides == side).sum() // per_call)
    with pytest.raises(ValueError, match="input size"):
        list(decode_masks(run, emb, boxes, box_image, window=policy))


def test_pasted_blocks_give_the_labels_of_whole_windows():
    """Blocks around the boxes: the same labels as whole windows; blocks a mask runs past are
    decoded again whole."""
    from cellsam_rt.stages.masks import paste_sides

    emb, boxes, box_image = _decode_inputs(seed=3)
    emb = np.repeat(np.repeat(emb, 8, axis=2), 8, axis=3)  # a 32-token grid, 128-px input
    policy = {"min": 16, "max": 32, "box_factor": 4}
    labels, calls = {}, {}
    for paste in (None, 1.5):
        run = _FakeWindowDecoder(128, steep=2000.0, size=128)
        out = np.zeros((128, 128), np.uint32)
        for idx, logits, _ in decode_masks(run, emb, boxes, box_image, chunk_size=5,
                                           window=policy, size=128, paste=paste):
            paste_masks(out, logits, idx + 1, 128)
        labels[paste], calls[paste] = out, run.calls
    np.testing.assert_array_equal(labels[1.5], labels[None])
    assert len(np.unique(labels[None])) > 10
    # calls run side by side give the same labels
    out = np.zeros((128, 128), np.uint32)
    for idx, logits, _ in decode_masks(_FakeWindowDecoder(128, steep=2000.0, size=128), emb, boxes,
                                       box_image, chunk_size=5, window=policy, size=128,
                                       paste=1.5, workers=3):
        paste_masks(out, logits, idx + 1, 128)
    np.testing.assert_array_equal(out, labels[None])
    cropped = sum(c[1] for c in calls[1.5] if len(c) == 4)
    redone = sum(c[1] for c in calls[1.5] if len(c) == 3) - sum(c[1] for c in calls[None] if c[0] == "window") + cropped
    assert cropped > 0 and 0 < redone < cropped  # most blocks held their mask, some did not
    sides = paste_sides(np.array([[0, 0, 24, 16]], np.float32), np.array([16]), 128, 32, 2.0)
    assert sides.tolist() == [16]  # 6 tokens -> 12 + 2 -> 16 (steps of 4, at most the window)
