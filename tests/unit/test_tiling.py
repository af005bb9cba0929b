"""Tiling: the reference's tile geometry, periodic tiles, seam merging, and the 3000x2000 must-show."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cellsam_rt.stages import tiling
from cellsam_rt.stages.tiling import extract_tile, segment_tiled, stitch_tiles, tile_grid

# ----------------------------------------------------------------------------- helpers


def disks_truth(shape, disks):
    """Ground-truth label image: disk i (cy, cx, r) gets label i + 1."""
    gt = np.zeros(shape, dtype=np.int32)
    for i, (cy, cx, r) in enumerate(disks):
        y0, y1 = max(cy - r, 0), min(cy + r + 1, shape[0])
        x0, x1 = max(cx - r, 0), min(cx + r + 1, shape[1])
        yy, xx = np.mgrid[y0:y1, x0:x1]
        gt[y0:y1, x0:x1][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i + 1
    return gt


def tiles_from_truth(gt, grid, seed=0):
    """Per-tile label images as a perfect segmenter would give them, numbered independently."""
    rng = np.random.default_rng(seed)
    out = []
    for t in grid:
        lab = extract_tile(gt, t)
        ids = np.unique(lab[lab > 0])
        remap = np.zeros(int(gt.max()) + 1, dtype=np.int32)
        remap[ids] = rng.permutation(len(ids)) + 1
        out.append(remap[lab])
    return out


def best_ious(labels, gt):
    """For each ground-truth label, the best IoU of any output label."""
    labels = labels.astype(np.int64).ravel()
    gt = gt.astype(np.int64).ravel()
    area_l = np.bincount(labels)
    area_g = np.bincount(gt)
    both = (labels > 0) & (gt > 0)
    base = int(labels.max()) + 1
    keys, inter = np.unique(gt[both] * base + labels[both], return_counts=True)
    g, lab = keys // base, keys % base
    iou = inter / (area_g[g] + area_l[lab] - inter)
    best = np.zeros(len(area_g))
    np.maximum.at(best, g, iou)
    return best[1:]


def assert_each_once_whole(labels, gt):
    """Every ground-truth cell is one output label (IoU >= 0.99) and nothing else is labelled."""
    n_out = len(np.unique(labels[labels > 0]))
    ious = best_ious(labels, gt)
    assert n_out == gt.max(), f"{n_out} labels for {gt.max()} cells"
    assert ious.min() >= 0.99, f"worst IoU {ious.min():.3f} (cell {ious.argmin() + 1})"


# ----------------------------------------------------------------------------- geometry

# Block edges as dask makes them: da.from_array(img, chunks=256).rechunk(400) then
# da.overlap.overlap(depth=56, boundary="periodic"), checked against dask 2026.8.0. A last chunk
# shorter than the overlap is topped up from the chunk before it (dask's ensure_minimum_chunksize).
DASK_CHUNKS = {
    2000: [400] * 5, 3000: [400] * 7 + [200], 810: [400, 354, 56], 900: [400, 400, 100],
    450: [394, 56], 1210: [400, 400, 354, 56], 401: [345, 56], 456: [400, 56], 300: [300],
    57: [57],
}


@pytest.mark.parametrize("length", sorted(DASK_CHUNKS))
def test_chunk_edges_match_dask(length):
    edges = tiling.chunk_edges(length)
    assert list(np.diff(edges)) == DASK_CHUNKS[length]
    assert edges[0] == 0 and edges[-1] == length


def test_image_smaller_than_overlap_is_an_error():
    with pytest.raises(ValueError, match="overlap"):
        tiling.chunk_edges(40)


@pytest.mark.parametrize("shape", [(2000, 3000), (810, 900), (300, 200), (1210, 450)])
def test_grid_covers_image_with_overlap(shape):
    grid = tile_grid(shape)
    cover = np.zeros(shape, dtype=np.int32)
    for t in grid:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        th, tw = t.shape
        # Every tile is its block plus 56 px on each side: 512 px inside, smaller at the end.
        assert (th, tw) == (t.y1 - t.y0 + 112, t.x1 - t.x0 + 112)
        assert t.origin == (t.y0 - 56, t.x0 - 56)
        assert th <= 512 and tw <= 512 and (th == 512) == (t.y1 - t.y0 == 400)
    assert (cover == 1).all()  # cores tile the image exactly once
    assert len(grid) == grid.n_rows * grid.n_cols
    assert [t.index for t in grid] == list(range(len(grid)))


def test_3000x2000_grid_edge_tiles():
    grid = tile_grid((2000, 3000))
    assert (grid.n_rows, grid.n_cols) == (5, 8)
    assert grid.tile(0, 0).shape == (512, 512)
    assert grid.tile(4, 7).shape == (512, 312)  # right edge: 200 px block + 2 x 56


def test_periodic_tiles_equal_wrap_padding():
    rng = np.random.default_rng(1)
    img = rng.random((810, 900, 3)).astype(np.float32)
    padded = np.pad(img, ((56, 56), (56, 56), (0, 0)), mode="wrap")
    grid = tile_grid(img.shape)
    for t in grid:
        th, tw = t.shape
        np.testing.assert_array_equal(extract_tile(img, t),
                                      padded[t.y0:t.y0 + th, t.x0:t.x0 + tw])
    # 2-D images work the same way.
    t = grid.tile(0, 0)
    np.testing.assert_array_equal(extract_tile(img[..., 0], t), padded[:512, :512, 0])


def test_tile_of_point():
    grid = tile_grid((2000, 3000))
    assert grid.tile_of_point(0, 0).index == 0
    assert grid.tile_of_point(399.9, 400.0).index == 1
    assert grid.tile_of_point(1999, 2999).index == len(grid) - 1
    assert grid.tile_of_point(-5, 5000).index == 7  # clamped into the image


# ----------------------------------------------------------------------------- seam merging


@pytest.mark.parametrize("shape,disk", [
    ((400, 800), (200, 400, 30)),    # straddles the vertical seam at x=400
    ((800, 400), (400, 200, 30)),    # straddles the horizontal seam at y=400
    ((800, 800), (400, 400, 45)),    # sits on a 4-tile corner
    ((800, 800), (395, 410, 90)),    # larger than the overlap: no tile sees it whole
])
def test_cell_across_seams_comes_out_once_whole(shape, disk):
    gt = disks_truth(shape, [disk])
    grid = tile_grid(shape)
    for whole in (True, False):
        res = stitch_tiles(grid, tiles_from_truth(gt, grid), whole_cells=whole)
        assert res.n_cells == 1
        np.testing.assert_array_equal(res.labels, gt)


def test_neighbouring_cells_are_not_merged():
    # Two cells touching exactly at the seam, and two round ones 2 px apart across it.
    gt = np.zeros((400, 800), dtype=np.int32)
    gt[100:200, 360:400] = 1
    gt[100:200, 400:440] = 2
    gt[:] = np.where(disks_truth(gt.shape, [(300, 380, 20)]) > 0, 3, gt)
    gt[:] = np.where(disks_truth(gt.shape, [(300, 422, 20)]) > 0, 4, gt)
    grid = tile_grid(gt.shape)
    res = stitch_tiles(grid, tiles_from_truth(gt, grid))
    assert res.n_cells == 4
    assert_each_once_whole(res.labels, gt)


def test_missed_fragment_is_restored_from_the_better_tile():
    # The disk spans x 325..415: tile 0 sees it whole, tile 1 (from x=344) only a cut fragment,
    # which a model may miss. The reference's rule then loses the part past the seam.
    gt = disks_truth((400, 800), [(200, 370, 45)])
    grid = tile_grid(gt.shape)
    tl = tiles_from_truth(gt, grid)
    tl[1][:] = 0
    ref = stitch_tiles(grid, tl, whole_cells=False)
    assert ref.n_cells == 1 and (ref.labels[:, 400:] == 0).all()  # cut at the seam
    res = stitch_tiles(grid, tl)
    np.testing.assert_array_equal(res.labels, gt)
    assert tuple(res.sources[0]) == (0, 1)


def test_inconsistent_fragment_is_not_a_second_cell():
    # Tile 1 segments a thin piece of the disk (IoU in the strip < 0.5, so no link): the
    # reference's rule gives two pieces; the better-seen whole cell absorbs the fragment.
    gt = disks_truth((400, 800), [(200, 370, 45)])
    grid = tile_grid(gt.shape)
    tl = tiles_from_truth(gt, grid)
    frag = tl[1] > 0
    frag[:, :51] = False  # tile 1 x=51 is image x=395
    tl[1] = frag.astype(np.int32) * 7
    ref = stitch_tiles(grid, tl, whole_cells=False)
    assert ref.n_cells == 2
    res = stitch_tiles(grid, tl)
    assert res.n_cells == 1
    np.testing.assert_array_equal(res.labels, gt)


def test_wrapped_margin_content_is_dropped():
    # A cell at the right image border shows up, wrapped, in the left margin of tile 0.
    gt = disks_truth((400, 800), [(200, 785, 12)])
    grid = tile_grid(gt.shape)
    tl = tiles_from_truth(gt, grid)
    assert tl[0][:, :56].any()  # the wrapped copy is there
    res = stitch_tiles(grid, tl)
    assert res.n_cells == 1
    np.testing.assert_array_equal(res.labels, gt)


def test_empty_tiles_give_empty_labels():
    grid = tile_grid((900, 1000))
    res = stitch_tiles(grid, [np.zeros(t.shape, np.int32) for t in grid])
    assert res.n_cells == 0 and res.labels.shape == (900, 1000) and not res.labels.any()


def test_stitch_checks_tile_shapes():
    grid = tile_grid((900, 1000))
    with pytest.raises(ValueError):
        stitch_tiles(grid, [np.zeros((10, 10), np.int32)] * len(grid))


# ----------------------------------------------------------------------------- must-show


def _seam_disks(shape, rng):
    """Disks on seams, on 4-tile corners, in cores, at the border: none overlapping."""
    h, w = shape
    cands = []
    for y in range(400, h, 400):  # 4-tile corners
        for x in range(400, w, 400):
            r = int(rng.integers(15, 45))
            cands.append((y + rng.integers(-r + 3, r - 2), x + rng.integers(-r + 3, r - 2), r))
    cands.append((800, 1600, 75))  # bigger than the overlap: no tile sees it whole
    for x in range(400, w, 400):  # straddling vertical seams, barely or centrally
        for y in rng.integers(40, h - 40, size=6):
            r = int(rng.integers(8, 35))
            cands.append((y, x + rng.integers(-r + 2, r - 1), r))
    for y in range(400, h, 400):  # straddling horizontal seams
        for x in rng.integers(40, w - 40, size=8):
            r = int(rng.integers(8, 35))
            cands.append((y + rng.integers(-r + 2, r - 1), x, r))
    for _ in range(60):  # anywhere, including cut by the image border
        cands.append((rng.integers(0, h), rng.integers(0, w), rng.integers(6, 30)))
    disks = []
    for cy, cx, r in cands:
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 3) ** 2 for y, x, q in disks):
            disks.append((int(cy), int(cx), int(r)))
    return disks


def _straddles(disk, grid):
    """Whether a disk crosses an internal seam of the grid."""
    cy, cx, r = disk
    return (any(abs(cy - e) < r for e in grid.row_edges[1:-1])
            or any(abs(cx - e) < r for e in grid.col_edges[1:-1]))


def _threshold_segmenter(min_size=25, miss_cut_below=0):
    """A deterministic stand-in for the model: connected components of a thresholded tile.

    miss_cut_below > 0 makes it miss cells cut by the tile edge to fewer pixels than that, as a
    model that sees only a sliver of a cell may.
    """
    calls = []

    def segment_batch(tiles):
        calls.append(len(tiles))
        out = []
        for tile in tiles:
            lab, n = ndimage.label(tile > 0.5)
            sizes = np.bincount(lab.ravel())
            drop = sizes < min_size  # the pipeline drops masks under 25 px too
            if miss_cut_below:
                edge = np.unique(np.r_[lab[0], lab[-1], lab[:, 0], lab[:, -1]])
                cut = np.zeros(len(sizes), bool)
                cut[edge] = True
                drop |= cut & (sizes < miss_cut_below)
            drop[0] = True
            lab[drop[lab]] = 0
            out.append(lab.astype(np.int32))
        return out

    return segment_batch, calls


def test_3000x2000_cells_across_seams_come_out_once_and_whole():
    """Must-show: a 3000x2000 image whose cells straddle tile seams and corners."""
    shape = (2000, 3000)
    rng = np.random.default_rng(7)
    disks = _seam_disks(shape, rng)
    gt = disks_truth(shape, disks)
    # Disks that are cut by the image border are cells too: keep only what lies in the image.
    img = (gt > 0).astype(np.float32) + rng.normal(0, 0.05, shape).astype(np.float32)
    on_seam = sum(_straddles(d, tile_grid(shape)) for d in disks)
    assert len(disks) > 120 and on_seam >= 80, (len(disks), on_seam)  # really about seams

    segment_batch, calls = _threshold_segmenter()
    seen = []
    res, grid = segment_tiled(img, segment_batch, batch_size=6,
                              progress=lambda done, total: seen.append((done, total)))
    assert len(grid) == 40 and calls == [6] * 6 + [4]
    assert seen == [(i + 1, 40) for i in range(40)]
    assert res.labels.shape == shape and res.n_cells == len(np.unique(res.labels)) - 1
    # Pixels of disks cut by the border to < 25 px in the image are legitimately dropped.
    sizes = np.bincount(gt.ravel(), minlength=len(disks) + 1)
    gt_kept = np.where(sizes[gt] >= 25, gt, 0)
    renumber = np.zeros(len(sizes), dtype=np.int32)
    renumber[np.unique(gt_kept)] = np.arange(len(np.unique(gt_kept)))
    gt_kept = renumber[gt_kept]
    assert_each_once_whole(res.labels, gt_kept)
    # Exactly whole, pixel for pixel: the labels are the ground truth up to numbering.
    pairs = np.unique(gt_kept.ravel().astype(np.int64) * (res.n_cells + 1) + res.labels.ravel())
    assert len(pairs) == gt_kept.max() + 1  # a one-to-one map, background included


def test_median_area_fraction():
    lab = np.zeros((100, 100), np.int32)
    lab[:10, :10] = 1     # 100 px
    lab[50:52, :10] = 2   # 20 px
    lab[80:90, :3] = 5    # 30 px
    assert tiling.median_area_fraction(lab) == pytest.approx(30 / 10000)
    assert np.isnan(tiling.median_area_fraction(np.zeros((5, 5), np.int32)))


def test_3000x2000_whole_cells_when_tiles_miss_cut_fragments():
    """Must-show, harder: tiles miss cells their edge cuts to a sliver; cells still come out whole.

    Disks of radius 30-55 px sit across seams and corners, so the tile holding a disk's centre
    sees it whole while its neighbours see cut pieces, which this stand-in model misses (it only
    finds cells that its tile shows whole). The reference's rule alone (each pixel from its core
    tile) then cuts those cells at the seams.
    """
    shape = (2000, 3000)
    rng = np.random.default_rng(11)
    cands = []
    for y in range(400, shape[0], 400):
        for x in range(400, shape[1], 400):
            r = int(rng.integers(30, 56))
            cands.append((y + rng.integers(-r + 3, r - 2), x + rng.integers(-r + 3, r - 2), r))
        for x in rng.integers(80, shape[1] - 80, size=6):
            r = int(rng.integers(30, 56))
            cands.append((y + rng.integers(-r + 3, r - 2), x, r))
    for x in range(400, shape[1], 400):
        for y in rng.integers(80, shape[0] - 80, size=4):
            r = int(rng.integers(30, 56))
            cands.append((y, x + rng.integers(-r + 3, r - 2), r))
    disks = []
    for cy, cx, r in cands:
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 3) ** 2 for y, x, q in disks):
            disks.append((int(cy), int(cx), int(r)))
    grid = tile_grid(shape)
    assert len(disks) > 50 and all(_straddles(d, grid) for d in disks)
    gt = disks_truth(shape, disks)
    img = (gt > 0).astype(np.float32)
    segment_batch, _ = _threshold_segmenter(miss_cut_below=10**9)
    ref, _ = segment_tiled(img, segment_batch, whole_cells=False)
    res, _ = segment_tiled(img, segment_batch)
    assert (best_ious(ref.labels, gt) < 0.99).sum() >= 10  # the reference's rule cuts cells
    assert_each_once_whole(res.labels, gt)
    pairs = np.unique(gt.ravel().astype(np.int64) * (res.n_cells + 1) + res.labels.ravel())
    assert len(pairs) == gt.max() + 1  # pixel-exact, one label per disk


# ----------------------------------------------------------------------------- Segmenter, tiled


@pytest.fixture(scope="module")
def shaped_dir(tmp_path_factory, tiny_model_dir):
    """The tiny fixture model re-shaped to find cells (see shaped_model.py)."""
    pytest.importorskip("torch")
    from shaped_model import shaped_model_dir

    return shaped_model_dir(tiny_model_dir, tmp_path_factory.mktemp("shaped"), False)[0]


def _big_blob_image(h=900, w=1200, seed=3):
    from shaped_model import blob_image

    return blob_image(h, w, n=120, seed=seed)


def test_segmenter_tiled_end_to_end_batching_gives_same_labels(shaped_dir):
    from cellsam_rt.pipeline.segmenter import Segmenter

    img = _big_blob_image()
    seen = []
    a = Segmenter(shaped_dir, tile="always", batch_size=4,
                  progress=lambda d, t: seen.append((d, t))).segment(img)
    b = Segmenter(shaped_dir, tile="always", batch_size=1).segment(img)
    assert a.tiled and a.labels.shape == img.shape and a.labels.dtype == np.uint16
    assert seen == [(i + 1, 9) for i in range(9)]  # 3 x 3 tiles of a 900x1200 image
    assert a.n_cells > 5
    np.testing.assert_array_equal(a.labels, b.labels)
    # Batched matmuls round differently in the last float32 bits; the labels do not move.
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=1e-2)
    # Labels are 1..n, each label's row in the table, a box and a detection score per label.
    np.testing.assert_array_equal(a.label_ids, np.arange(1, a.n_cells + 1))
    np.testing.assert_array_equal(np.unique(a.labels[a.labels > 0]), a.label_ids)
    np.testing.assert_array_equal(a.table["label"], a.label_ids)
    assert np.isfinite(a.scores).all() and a.boxes.shape == (a.n_cells, 4)
    assert a.timings["stitch"] >= 0 and a.timings["encoder"] > 0


def test_segmenter_tiled_user_boxes(shaped_dir):
    from cellsam_rt.pipeline.segmenter import Segmenter

    img = _big_blob_image(h=600, w=700, seed=5)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 600, (30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 60, (30, 2))], 1).astype(np.float32)
    res = Segmenter(shaped_dir, tile="always").segment(img, boxes=boxes)
    assert res.tiled and res.labels.shape == img.shape and res.n_cells > 0
    assert np.isnan(res.scores).all()
    for box in res.boxes:  # each label's box is one of the user's boxes, in image pixels
        assert np.abs(boxes - box).sum(axis=1).min() < 1e-2


def test_tiles_add_resolution_only_past_one_tile():
    """Up to one tile's side, the main tile is no smaller than the image along either axis."""
    from cellsam_rt.stages.tiling import TILE_SIZE, tile_grid, tiles_add_resolution

    assert TILE_SIZE == 512
    for shape in [(512, 512), (300, 512), (64, 64), (513, 100), (2000, 1500)]:
        assert tiles_add_resolution(shape) == (max(shape) > TILE_SIZE)
        main = tile_grid(shape)[0].shape
        if not tiles_add_resolution(shape):
            assert main[0] >= shape[0] and main[1] >= shape[1], (shape, main)
        else:
            assert main[0] < shape[0] or main[1] < shape[1], (shape, main)
