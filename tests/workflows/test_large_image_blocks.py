"""The blockwise building blocks without a model: block geometry, the empty-block test, border
matching and the final numbering."""
from __future__ import annotations

import numpy as np
import pytest

from cellsam_rt.workflows.blockwise import (BlockPlan, assemble_core, border_match,
                                            compact_table, looks_empty, merge_tables,
                                            strip_pairs)


def test_neighbouring_bands_cover_the_same_pixels():
    plan = BlockPlan(1000, 900, block=384, overlap=64)
    assert (plan.rows, plan.cols) == (3, 3)
    image = np.arange(1000 * 900).reshape(1000, 900)
    seen = 0
    for a, band_a, b, band_b, axis in plan.borders():
        (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = plan.expanded(*a), plan.expanded(*b)
        sa = image[ay0:ay1, ax0:ax1][plan.bands(*a)[band_a]]
        sb = image[by0:by1, bx0:bx1][plan.bands(*b)[band_b]]
        assert np.array_equal(sa, sb)
        # the first `overlap` rows / columns of the strip are a's core, the rest b's
        first = sa[:, 0] if axis == 1 else sa[0]
        y0, y1, x0, x1 = plan.core(*a)
        assert np.all((first % 900 == x1 - 64) if axis == 1 else (first // 900 == y1 - 64))
        seen += 1
    assert seen == 12
    for a, bands_a, b, bands_b in plan.corners():  # diagonal neighbours share a square
        (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = plan.expanded(*a), plan.expanded(*b)
        sa = image[ay0:ay1, ax0:ax1][plan.square(*a, bands_a)]
        sb = image[by0:by1, bx0:bx1][plan.square(*b, bands_b)]
        assert sa.shape == (128, 128) and np.array_equal(sa, sb)
        seen += 1
    assert seen == 12 + 8
    cores = np.zeros((1000, 900), int)
    for i, j in plan:
        y0, y1, x0, x1 = plan.core(i, j)
        cores[y0:y1, x0:x1] += 1
    assert (cores == 1).all()
    with pytest.raises(ValueError):
        BlockPlan(100, 100, block=128, overlap=65)


def _disc(shape, cy, cx, r):
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_empty_blocks_are_noise_only():
    rng = np.random.default_rng(0)
    noise = rng.normal(100, 10, (600, 600))
    assert looks_empty(noise.astype(np.uint16))
    assert looks_empty(np.zeros((300, 300), np.uint16))
    one = noise.copy()
    one[_disc(one.shape, 300, 300, 12)] += 300  # one dim nucleus
    assert not looks_empty(one.astype(np.uint16))
    # a carpet of touching cells: the median is inside cells, still not empty
    carpet = 100 + 400 * (np.sin(np.arange(600) / 4.0)[:, None] * np.sin(np.arange(600) / 4.0)
                          > 0.1) + rng.normal(0, 10, (600, 600))
    assert not looks_empty(carpet.astype(np.uint16))
    # a channel with signal makes the block non-empty
    assert not looks_empty(np.stack([noise, one], -1).astype(np.uint16))


def test_border_match_pairs_and_cells_one_block_missed():
    a = np.zeros((40, 20), np.uint32)
    b = np.zeros((40, 20), np.uint32)
    a[2:10, 6:14] = 1            # the same cell in both strips
    b[3:10, 6:15] = 4
    b[20:28, 2:8] = 2            # found by b only, in a's half of the strip (columns < 10)
    a[30:36, 12:18] = 3          # found by a only, reaching b's half
    a[14:18, 1:4] = 5            # found by a only, inside a's half
    pairs, into_a, into_b = border_match(a, b, axis=1, margin=10)
    assert pairs.tolist() == [[1, 4]]
    assert into_a.tolist() == [[2, 48]]
    assert into_b.tolist() == [[3, 36]]
    assert strip_pairs(a, np.zeros_like(b)).shape == (0, 2)


def test_merge_tables_joins_chains_numbers_in_order_and_drops_slivers():
    # three blocks; a cell seen as (0:2) ~ (1:1) ~ (2:3); block 1's label 2 only in a margin;
    # block 2's label 1 is a 5-pixel sliver.
    counts = [2, 2, 3]
    present = [np.array([[1, 50], [2, 40]]), np.array([[1, 30]]),
               np.array([[1, 5], [2, 60], [3, 20]])]
    links = [(0, np.array([[2, 1]]), 1, np.zeros((0, 2)), np.zeros((0, 2))),
             (1, np.array([[1, 3]]), 2, np.zeros((0, 2)), np.zeros((0, 2)))]
    tables = merge_tables(counts, present, links, min_area=10)
    assert [t.tolist() for t in tables] == [[1, 2], [2, 0], [0, 3, 2]]


def test_assemble_core_fills_what_the_block_missed():
    plan = BlockPlan(200, 200, block=100, overlap=20)
    core = np.zeros((100, 100), np.uint32)
    core[10:20, 10:20] = 1
    band_b = np.zeros((120, 40), np.uint32)  # block (0, 1)'s left band: image columns 80-120
    band_b[50:60, 10:30] = 7                  # a cell across the border at columns 90-110
    out = assemble_core(plan, 0, 0, core, np.array([5]),
                        [("right", band_b, np.array([0, 0, 0, 0, 0, 0, 9]), [[7, 200]])])
    assert out.dtype == np.uint32 and set(np.unique(out)) == {0, 5, 9}
    assert (out[50:60, 90:100] == 9).all() and (out == 9).sum() == 100


def test_compact_table_closes_gaps_in_order():
    lut = compact_table([np.array([1, 4]), np.array([2, 4, 7]), np.zeros(0)])
    assert lut.tolist() == [0, 1, 2, 0, 3, 0, 0, 4]
