"""Blockwise segmentation of images larger than one segmentation call: blocks with overlap,
cells merged across block borders, labels unique over the whole image.

The image is cut into square blocks (`block` pixels, the *core*); each block is segmented with a
margin of `overlap` pixels on every side that has a neighbour (the *expanded* block), so a cell
crossing a block border is seen whole by both blocks. Labels are made global by per-block offsets;
along every shared border the two blocks' labels are compared over the strip both of them saw
(2 x overlap wide) and pairs with IoU > 0.5 (a one-to-one match) are the same cell. Matched labels
are joined (connected components of the match graph, `scipy.sparse.csgraph`), numbered 1..K in
block order, and every block writes its core with the final numbers. A cell wider than the overlap
that crosses a border may come out cut there.

`segment_array` builds this as a lazy Dask graph (the array API); `large_image.py` runs the same
steps with the block results on disk, for images and label arrays larger than memory.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

MATCH_IOU = 0.5          # strict: at most one partner per label across a border
EMPTY_SIGMAS = 10.0      # a block whose brightest pixel is < this many noise sigmas is skipped
DEFAULT_BLOCK = 2048
DEFAULT_OVERLAP = 96


@dataclass(frozen=True)
class BlockPlan:
    """The block grid of a height x width image."""

    height: int
    width: int
    block: int = DEFAULT_BLOCK
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if self.block < 64:
            raise ValueError(f"block must be >= 64 pixels, got {self.block}")
        if not 0 <= self.overlap <= self.block // 2:
            raise ValueError(f"overlap must be between 0 and block / 2 ({self.block // 2}), "
                             f"got {self.overlap}")

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.block)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.block)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, j) for i in range(self.rows) for j in range(self.cols))

    def __len__(self) -> int:
        return self.rows * self.cols

    def index(self, i: int, j: int) -> int:
        return i * self.cols + j

    def core(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of the block's own pixels."""
        b = self.block
        return i * b, min((i + 1) * b, self.height), j * b, min((j + 1) * b, self.width)

    def expanded(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of what the block segments: its core plus the overlap, in the image."""
        y0, y1, x0, x1 = self.core(i, j)
        m = self.overlap
        return max(y0 - m, 0), min(y1 + m, self.height), max(x0 - m, 0), min(x1 + m, self.width)

    def core_in_expanded(self, i: int, j: int) -> tuple[slice, slice]:
        y0, y1, x0, x1 = self.core(i, j)
        ey0, _, ex0, _ = self.expanded(i, j)
        return slice(y0 - ey0, y1 - ey0), slice(x0 - ex0, x1 - ex0)

    def bands(self, i: int, j: int) -> dict[str, tuple[slice, slice]]:
        """The strips of the expanded block shared with each neighbour (in expanded coordinates):
        the neighbour's own band covers the same image pixels."""
        y0, y1, x0, x1 = self.core(i, j)
        ey0, ey1, ex0, ex1 = self.expanded(i, j)
        m = self.overlap
        rows, cols = slice(0, ey1 - ey0), slice(0, ex1 - ex0)
        out = {}
        if j + 1 < self.cols:
            out["right"] = rows, slice(x1 - m - ex0, min(x1 + m, self.width) - ex0)
        if j > 0:
            out["left"] = rows, slice(0, min(x0 + m, self.width) - ex0)
        if i + 1 < self.rows:
            out["bottom"] = slice(y1 - m - ey0, min(y1 + m, self.height) - ey0), cols
        if i > 0:
            out["top"] = slice(0, min(y0 + m, self.height) - ey0), cols
        return out

    def borders(self) -> Iterator[tuple[tuple[int, int], str, tuple[int, int], str, int]]:
        """Every shared border once: (block a, a's band, block b, b's band, axis across it)."""
        for i, j in self:
            if j + 1 < self.cols:
                yield (i, j), "right", (i, j + 1), "left", 1
            if i + 1 < self.rows:
                yield (i, j), "bottom", (i + 1, j), "top", 0

    def corners(self) -> Iterator[tuple[tuple[int, int], tuple, tuple[int, int], tuple]]:
        """The two diagonal pairs of every corner four blocks share: (block a, a's (row band,
        column band), block b, b's bands); `square` gives the region both segmented."""
        for i in range(self.rows - 1):
            for j in range(self.cols - 1):
                yield (i, j), ("bottom", "right"), (i + 1, j + 1), ("top", "left")
                yield (i, j + 1), ("bottom", "left"), (i + 1, j), ("top", "right")

    def square(self, i: int, j: int, bands: tuple) -> tuple[slice, slice]:
        """A corner square in the block's expanded coordinates (rows of one band, columns of
        the other)."""
        b = self.bands(i, j)
        return b[bands[0]][0], b[bands[1]][1]


# ---------------------------------------------------------------- one block

def looks_empty(image: np.ndarray, sigmas: float = EMPTY_SIGMAS) -> bool:
    """True when no channel of the block has a pixel `sigmas` noise sigmas above its median.

    The noise sigma comes from differences of neighbouring pixels (robust to cells, which are
    smooth at that scale), so a dense carpet of cells is not mistaken for background.
    """
    img = image if image.ndim == 3 else image[..., None]
    for c in range(img.shape[2]):
        ch = img[..., c]
        if ch.shape[0] < 2 or ch.shape[1] < 2:
            return False
        sample = ch[::2].astype(np.float32)
        diff = np.diff(sample, axis=1).ravel()
        sigma = 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / math.sqrt(2.0)
        peak = float(ch.max()) - float(np.median(sample))
        if peak > 0 and (sigma == 0 or peak >= sigmas * sigma):
            return False
    return True


def segment_block(segmenter, image: np.ndarray, channels=None, skip_empty: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Labels 1..n (uint32) of one expanded block and each label's detection score."""
    if skip_empty and looks_empty(image):
        return np.zeros(image.shape[:2], np.uint32), np.zeros(0, np.float32)
    result = segmenter.segment(image, channels=channels)
    ids = np.asarray(result.label_ids, np.int64)
    lut = np.zeros(int(result.labels.max()) + 1 if result.labels.size else 1, np.uint32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    return lut[result.labels], np.asarray(result.scores, np.float32).reshape(-1)


def strip_pairs(a: np.ndarray, b: np.ndarray, iou: float = MATCH_IOU) -> np.ndarray:
    """[k, 2] label pairs of two aligned strips whose IoU over the strip is above `iou`."""
    a = np.asarray(a).ravel().astype(np.int64)
    b = np.asarray(b).ravel().astype(np.int64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    base = int(b.max()) + 1
    keys, inter = np.unique(a[both] * base + b[both], return_counts=True)
    la, lb = keys // base, keys % base
    area_a, area_b = np.bincount(a), np.bincount(b)
    keep = inter / (area_a[la] + area_b[lb] - inter) > iou
    return np.stack([la[keep], lb[keep]], axis=1)


def label_areas(labels: np.ndarray) -> np.ndarray:
    """[k, 2] (label, pixels) of the labels in an array."""
    ids, n = np.unique(labels[labels > 0], return_counts=True)
    return np.stack([ids.astype(np.int64), n.astype(np.int64)], axis=1)


def _missed(src: np.ndarray, other: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """[k, 2] (label, pixels in `reach`) of the labels of `src` that reach into `reach` (a part
    of src) and lie on background in `other` everywhere."""
    found = label_areas(reach)
    touching = np.unique(src[(src > 0) & (other > 0)])
    return found[~np.isin(found[:, 0], touching)]


def border_match(band_a: np.ndarray, band_b: np.ndarray, axis: int, margin: int) -> tuple:
    """Compare the strips two blocks share (a above / left of b; a's core is the first `margin`
    rows / columns of the strip): (matched pairs, b's labels a missed, a's labels b missed).

    A cell that one block found and the other did not (the other has only background under it)
    is taken from the block that found it, in the other block's core too.
    """
    near = [slice(None), slice(None)]
    far = list(near)
    near[axis], far[axis] = slice(0, margin), slice(margin, None)
    return (strip_pairs(band_a, band_b), _missed(band_b, band_a, band_b[tuple(near)]),
            _missed(band_a, band_b, band_a[tuple(far)]))


def merge_tables(counts: Sequence[int], present: Sequence[np.ndarray],
                 links: Sequence[tuple], min_area: int = 0) -> list[np.ndarray]:
    """Per block, the table local label -> final label.

    counts[b]: labels 1..counts[b] of block b; present[b]: [k, 2] (label, pixels) of those found
    in its core (`label_areas`); links:
    (block a, [k, 2] pairs of (a's label, b's label), block b, b's labels filled into a's core,
    a's labels filled into b's core), as `border_match` gives. Matched labels get one number;
    numbers go 1..K in order of first appearance (block order, then label), labels seen only in
    margins get 0, and so do cells with fewer than `min_area` pixels in the cores (a sliver of a
    cell that lies in a margin).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    counts = np.asarray(counts, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n = int(counts.sum()) + 1
    src = [np.zeros(0, np.int64)]
    dst = [np.zeros(0, np.int64)]
    seen = [np.zeros((0, 2), np.int64)]
    seen += [np.asarray(p, np.int64).reshape(-1, 2) + [offsets[k], 0]
             for k, p in enumerate(present)]
    for a, pairs, b, into_a, into_b in links:
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        src.append(offsets[a] + pairs[:, 0])
        dst.append(offsets[b] + pairs[:, 1])
        seen += [np.asarray(into_a, np.int64).reshape(-1, 2) + [offsets[b], 0],
                 np.asarray(into_b, np.int64).reshape(-1, 2) + [offsets[a], 0]]
    s, d = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(s), np.int8), (s, d)), shape=(n, n))
    n_comp, comp = connected_components(graph, directed=False)
    seen = np.concatenate(seen)
    final_of = np.zeros(n_comp, np.int64)
    if seen.size:
        area = np.bincount(comp[seen[:, 0]], weights=seen[:, 1], minlength=n_comp)
        keep = area[comp[seen[:, 0]]] >= max(min_area, 1)
        order, first = np.unique(comp[seen[keep, 0]], return_index=True)
        final_of[order[np.argsort(first)]] = np.arange(1, len(order) + 1)
    return [final_of[comp[offsets[k] + 1: offsets[k] + counts[k] + 1]] for k in range(len(counts))]


def corner_link(a: int, square_a: np.ndarray, b: int, square_b: np.ndarray) -> tuple:
    """A link (as `merge_tables` takes them) between diagonal neighbours: matches only."""
    empty = np.zeros((0, 2), np.int64)
    return a, strip_pairs(square_a, square_b), b, empty, empty


def compact_table(used: Sequence[np.ndarray]) -> np.ndarray:
    """Old number -> new for the numbers found in the written labels, renumbered 1..K in order
    (a cell that lost every pixel to a neighbour's copy leaves no gap)."""
    ids = np.unique(np.concatenate([np.zeros(1, np.int64)] + [np.asarray(u, np.int64).ravel()
                                                             for u in used]))
    ids = ids[ids > 0]
    lut = np.zeros(int(ids.max()) + 1 if ids.size else 1, np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut


def relabel(core: np.ndarray, table: np.ndarray, dtype=np.uint32) -> np.ndarray:
    """A block's core (local labels) in final labels; `table[k - 1]` is local label k's number."""
    lut = np.concatenate([[0], np.asarray(table, np.int64)]).astype(dtype)
    return lut[core]


def assemble_core(plan: BlockPlan, i: int, j: int, core: np.ndarray, table: np.ndarray,
                  fills: Sequence[tuple], dtype=np.uint32) -> np.ndarray:
    """A block's final labels: its own cells, then on its background the cells a neighbour found
    and it missed. fills: (this block's band name, the neighbour's band labels, the
    neighbour's table, the neighbour's labels to take)."""
    out = relabel(core, table, dtype)
    ey0, ey1, ex0, ex1 = plan.expanded(i, j)
    cy, cx = plan.core_in_expanded(i, j)
    bands = plan.bands(i, j)
    for band, labels, nb_table, ids in fills:
        ids = np.asarray(ids, np.int64).reshape(-1, 2)[:, 0]
        if not ids.size:
            continue
        lut = np.zeros(max(int(labels.max()), int(ids.max())) + 1, dtype)
        lut[ids] = np.asarray(nb_table, np.int64)[ids - 1]
        canvas = np.zeros((ey1 - ey0, ex1 - ex0), dtype)
        canvas[bands[band]] = lut[labels]
        add = canvas[cy, cx]
        np.copyto(out, add, where=(out == 0) & (add > 0))
    return out


# ---------------------------------------------------------------- per-process model cache

_SEGMENTERS: dict[str, tuple] = {}
_SEGMENTERS_LOCK = threading.Lock()


def cached_segmenter(options: dict) -> tuple:
    """(Segmenter, lock) for these Segmenter keywords, loaded once per process (one at a time)."""
    key = repr(sorted(options.items()))
    with _SEGMENTERS_LOCK:
        entry = _SEGMENTERS.get(key)
        if entry is None:
            from cellsam_rt.pipeline import Segmenter

            _SEGMENTERS.clear()  # one loaded model per process
            entry = _SEGMENTERS[key] = (Segmenter(**options), threading.Lock())
    return entry


def keep_segmenter(options: dict, segmenter) -> None:
    """Use an already loaded Segmenter for these keywords in this process."""
    with _SEGMENTERS_LOCK:
        _SEGMENTERS.clear()
        _SEGMENTERS[repr(sorted(options.items()))] = (segmenter, threading.Lock())


# ---------------------------------------------------------------- the array API

def _segment_expanded(region: np.ndarray, options: dict, channels, skip_empty: bool):
    segmenter, lock = cached_segmenter(options)
    with lock:
        labels, _ = segment_block(segmenter, np.asarray(region), channels, skip_empty)
    return labels


def _match(band_a: np.ndarray, band_b: np.ndarray, a: int, b: int, axis: int,
           margin: int) -> tuple:
    pairs, into_a, into_b = border_match(band_a, band_b, axis, margin)
    return a, pairs, b, into_a, into_b


def _block_info(labels: np.ndarray, core) -> tuple[int, np.ndarray]:
    """(number of labels, (label, pixels) of those in the core) of one expanded block."""
    return int(labels.max()) if labels.size else 0, label_areas(labels[core])


def _tables(infos: list, links: list, options: dict) -> list:
    return merge_tables([n for n, _ in infos], [p for _, p in infos], links,
                        cached_segmenter(options)[0].min_size)


def _used(final: np.ndarray) -> np.ndarray:
    return np.unique(final[final > 0])


def _compacted(final: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return lut.astype(np.uint32)[final]


def _final(plan: BlockPlan, i: int, j: int, labels: np.ndarray, tables: list,
           fills: list) -> np.ndarray:
    k = plan.index(i, j)
    cy, cx = plan.core_in_expanded(i, j)
    return assemble_core(plan, i, j, labels[cy, cx], tables[k],
                         [(band, nb_band, tables[nb], link[which])
                          for band, nb_band, nb, link, which in fills])


def segment_array(array, model: str = "default", block: int = DEFAULT_BLOCK,
                  overlap: int = DEFAULT_OVERLAP, channels=None, skip_empty: bool = True,
                  **segmenter_kwargs):
    """Segment a 2-D (YX) or channels-last (YXC) array blockwise; a lazy uint32 label array.

    `array`: a dask, zarr or numpy array. Blocks of `block` pixels are segmented with `overlap`
    pixels of margin (one `Segmenter.segment` call each, on whichever Dask scheduler computes
    the result); cells crossing block borders are merged into one label and labels are unique
    (1..K) over the whole array. Blocks without signal above the noise are skipped
    (`skip_empty=False` segments them too). Other keywords go to `Segmenter` (backend,
    threads, tile, bbox_threshold, ...).
    """
    import dask
    import dask.array as da

    arr = array if isinstance(array, da.Array) else da.from_array(array)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a YX or YXC array, got shape {arr.shape}")
    plan = BlockPlan(int(arr.shape[0]), int(arr.shape[1]), int(block), int(overlap))
    options = dict(segmenter_kwargs, model=model)
    seg = dask.delayed(_segment_expanded, pure=True)
    info = dask.delayed(_block_info, pure=True)
    labels, infos = [], []
    for i, j in plan:
        y0, y1, x0, x1 = plan.expanded(i, j)
        labels.append(seg(arr[y0:y1, x0:x1], options, channels, skip_empty))
        infos.append(info(labels[-1], plan.core_in_expanded(i, j)))
    match = dask.delayed(_match, pure=True)
    links, fills = [], {k: [] for k in range(len(plan))}
    for a, band_a, b, band_b, axis in plan.borders():
        ka, kb = plan.index(*a), plan.index(*b)
        sa, sb = labels[ka][plan.bands(*a)[band_a]], labels[kb][plan.bands(*b)[band_b]]
        links.append(match(sa, sb, ka, kb, axis, plan.overlap))
        fills[ka].append((band_a, sb, kb, links[-1], 3))
        fills[kb].append((band_b, sa, ka, links[-1], 4))
    corner = dask.delayed(corner_link, pure=True)
    for a, bands_a, b, bands_b in plan.corners():
        ka, kb = plan.index(*a), plan.index(*b)
        links.append(corner(ka, labels[ka][plan.square(*a, bands_a)], kb,
                            labels[kb][plan.square(*b, bands_b)]))
    tables = dask.delayed(_tables, pure=True)(infos, links, options)
    final = dask.delayed(_final, pure=True)
    finals = [final(plan, i, j, labels[plan.index(i, j)], tables, fills[plan.index(i, j)])
              for i, j in plan]
    lut = dask.delayed(compact_table, pure=True)([dask.delayed(_used, pure=True)(f)
                                                   for f in finals])
    compacted = dask.delayed(_compacted, pure=True)
    rows = []
    for i in range(plan.rows):
        row = []
        for j in range(plan.cols):
            y0, y1, x0, x1 = plan.core(i, j)
            row.append(da.from_delayed(compacted(finals[plan.index(i, j)], lut),
                                       shape=(y1 - y0, x1 - x0), dtype=np.uint32))
        rows.append(row)
    return da.block(rows)


__all__ = ["BlockPlan", "DEFAULT_BLOCK", "DEFAULT_OVERLAP", "EMPTY_SIGMAS", "MATCH_IOU",
           "assemble_core", "border_match", "cached_segmenter", "compact_table", "corner_link",
           "keep_segmenter", "label_areas", "looks_empty", "merge_tables", "relabel",
           "segment_array", "segment_block", "strip_pairs"]
