"""Tiling for large images (docs/design.md §2.10): the reference's tile grid, periodic tile extraction,
batched per-tile segmentation and seam merging into one label image.

Geometry follows the reference (`cellSAM/wsi.py`, dask): the image is cut into blocks of 400 px
(the last block along an axis is the remainder; a remainder under the overlap is merged into the
block before it, as dask's `overlap` does), and every block is grown by 56 px on each side with
periodic (wrap-around) content at the image border. So tiles are 512 px, smaller at the
right/bottom edge.

Seam merging follows the reference too: along every internal seam, the two neighbouring tiles'
labels are compared over the shared 2x56 px strip and labels with IoU >= 0.5 are the same cell
(union-find over all seams, so a cell spanning a 4-tile corner joins up transitively); each pixel
then takes its label from the tile whose core (the block itself) contains it.

That rule alone leaves a cell cut at a seam when the two tiles disagree about it: the tile that
sees the cell near its border misses the fragment or drops it as small (the part across the seam
is lost), or segments it differently (IoU < 0.5: the cell comes out as two pieces). We therefore
add one step (`whole_cells=True`, see `stitch_tiles`): every merged cell also gets the whole mask
from the tile that sees the largest part of it (that view is the least cut), pixels claimed by two
cells go to the one with the larger such view, and a cell left with less than half of what it
claimed is dropped as a duplicate fragment of a better-seen cell. Where the tiles agree about a
cell this changes nothing: the result is the reference's stitching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "BLOCK_SIZE", "OVERLAP", "SEAM_IOU_THRESHOLD", "TILE_MEDIAN_AREA_FRACTION",
    "Tile", "TileGrid", "StitchResult", "chunk_edges", "tile_grid", "extract_tile",
    "seam_links", "stitch_tiles", "segment_tiled", "median_area_fraction", "TILE_SIZE",
    "tiles_add_resolution",
]

BLOCK_SIZE = 400
OVERLAP = 56
SEAM_IOU_THRESHOLD = 0.5
#: the reference tiles when the median cell covers less than this fraction of the image
TILE_MEDIAN_AREA_FRACTION = 0.002
#: a tile's side: a block grown by the overlap on both sides
TILE_SIZE = BLOCK_SIZE + 2 * OVERLAP
#: a merged cell left with less than this share of the pixels it claimed is a duplicate fragment
_KEEP_FRACTION = 0.5


def _regular_chunks(length: int, block: int) -> list[int]:
    """dask's regular chunking of one axis: full blocks, then the remainder."""
    chunks = [block] * (length // block)
    if length % block:
        chunks.append(length % block)
    return chunks


def _min_chunks(chunks: list[int], size: int) -> list[int]:
    """Grow chunks below `size` the way dask's overlap does before it adds the margins."""
    if min(chunks) >= size:
        return chunks
    out: list[int] = []
    pending = 0
    for c in chunks:
        if c < size:
            if pending > 2 * size - c:
                # Borrow from the accumulated run so the short chunk reaches `size`.
                out.append(pending - (size - c))
                pending = size
            else:
                pending += c
        if pending >= size:
            out.append(pending)
            pending = 0
        if c >= size:
            pending += c
    if pending >= size:
        out.append(pending)
    elif out:
        out[-1] += pending
    else:
        raise ValueError(f"overlap {size} is larger than the image side {sum(chunks)}")
    return out


def chunk_edges(length: int, block: int = BLOCK_SIZE, overlap: int = OVERLAP) -> np.ndarray:
    """Block boundaries along one axis (0, ..., length), as the reference's dask chunking makes them."""
    if length <= 0:
        raise ValueError(f"axis length must be positive, got {length}")
    if block <= 0 or overlap < 0:
        raise ValueError(f"need block > 0 and overlap >= 0, got {block}, {overlap}")
    chunks = _regular_chunks(length, block)
    if overlap > 0:
        chunks = _min_chunks(chunks, overlap)
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


@dataclass(frozen=True)
class Tile:
    """One tile: its block (core) in image coordinates, grown by `depth` on every side."""

    index: int
    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int
    depth: int

    @property
    def origin(self) -> tuple[int, int]:
        """Image coordinates of the tile's top-left pixel (negative at the top/left border)."""
        return self.y0 - self.depth, self.x0 - self.depth

    @property
    def shape(self) -> tuple[int, int]:
        """Tile height and width, margins included."""
        return self.y1 - self.y0 + 2 * self.depth, self.x1 - self.x0 + 2 * self.depth

    @property
    def core(self) -> tuple[slice, slice]:
        """The block inside the tile, in tile coordinates."""
        d = self.depth
        return slice(d, d + self.y1 - self.y0), slice(d, d + self.x1 - self.x0)


@dataclass(frozen=True)
class TileGrid:
    """The tile layout of an image: row and column block edges plus the margin depth."""

    shape: tuple[int, int]
    row_edges: np.ndarray
    col_edges: np.ndarray
    depth: int

    @property
    def n_rows(self) -> int:
        """Number of tile rows."""
        return len(self.row_edges) - 1

    @property
    def n_cols(self) -> int:
        """Number of tile columns."""
        return len(self.col_edges) - 1

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def tile(self, row: int, col: int) -> Tile:
        """The tile at grid position (row, col)."""
        return Tile(index=row * self.n_cols + col, row=row, col=col,
                    y0=int(self.row_edges[row]), y1=int(self.row_edges[row + 1]),
                    x0=int(self.col_edges[col]), x1=int(self.col_edges[col + 1]),
                    depth=self.depth)

    def __iter__(self) -> Iterator[Tile]:
        for r in range(self.n_rows):
            for c in range(self.n_cols):
                yield self.tile(r, c)

    def __getitem__(self, index: int) -> Tile:
        return self.tile(*divmod(index, self.n_cols))

    def tile_of_point(self, y: float, x: float) -> Tile:
        """The tile whose core contains image point (y, x), clamped into the image."""
        r = int(np.searchsorted(self.row_edges, y, side="right")) - 1
        c = int(np.searchsorted(self.col_edges, x, side="right")) - 1
        return self.tile(min(max(r, 0), self.n_rows - 1), min(max(c, 0), self.n_cols - 1))


def tile_grid(shape: Sequence[int], block: int = BLOCK_SIZE, overlap: int = OVERLAP) -> TileGrid:
    """The reference's tile layout for an image of `shape` (H, W, ...)."""
    h, w = int(shape[0]), int(shape[1])
    return TileGrid(shape=(h, w), row_edges=chunk_edges(h, block, overlap),
                    col_edges=chunk_edges(w, block, overlap), depth=int(overlap))


def extract_tile(image: np.ndarray, tile: Tile) -> np.ndarray:
    """The tile's pixels, wrapping around at the image border (dask boundary="periodic")."""
    h, w = image.shape[:2]
    oy, ox = tile.origin
    th, tw = tile.shape
    # Modular indices equal np.pad(mode="wrap") without materialising the padded image.
    rows = np.arange(oy, oy + th) % h
    cols = np.arange(ox, ox + tw) % w
    return image[rows[:, None], cols[None, :]]


def _strip_pairs(a: np.ndarray, b: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Label pairs (a_label, b_label) whose IoU over two aligned strips reaches the threshold."""
    a = a.ravel().astype(np.int64)
    b = b.ravel().astype(np.int64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), dtype=np.int64)
    area_a = np.bincount(a)
    area_b = np.bincount(b)
    base = int(b.max()) + 1
    keys, inter = np.unique(a[both] * base + b[both], return_counts=True)
    la, lb = keys // base, keys % base
    # Areas count every pixel of the label in its strip, as the reference's confusion matrix does.
    iou = inter / (area_a[la] + area_b[lb] - inter)
    keep = iou >= iou_threshold
    return np.stack([la[keep], lb[keep]], axis=1)


def seam_links(grid: TileGrid, tile_labels: Sequence[np.ndarray],
               iou_threshold: float = SEAM_IOU_THRESHOLD) -> list[tuple[int, int, int, int]]:
    """Cells matched across every internal seam: (tile_a, label_a, tile_b, label_b) tuples."""
    s = 2 * grid.depth
    links: list[tuple[int, int, int, int]] = []
    if s == 0:
        return links
    for t in grid:
        la = tile_labels[t.index]
        if t.col + 1 < grid.n_cols:  # vertical seam to the right neighbour
            nb = grid.tile(t.row, t.col + 1)
            pairs = _strip_pairs(la[:, -s:], tile_labels[nb.index][:, :s], iou_threshold)
            links.extend((t.index, int(p), nb.index, int(q)) for p, q in pairs)
        if t.row + 1 < grid.n_rows:  # horizontal seam to the neighbour below
            nb = grid.tile(t.row + 1, t.col)
            pairs = _strip_pairs(la[-s:, :], tile_labels[nb.index][:s, :], iou_threshold)
            links.extend((t.index, int(p), nb.index, int(q)) for p, q in pairs)
    return links


@dataclass
class StitchResult:
    """Merged labels (1..n, int32) and, per label, the tile and tile label it was taken from."""

    labels: np.ndarray
    #: [n, 2] int64: row i describes label i+1 as (tile index, label within that tile)
    sources: np.ndarray

    @property
    def n_cells(self) -> int:
        """Number of cells in the merged image."""
        return int(len(self.sources))


def _centrality(grid: TileGrid, tile: Tile, bbox: tuple[slice, slice]) -> int:
    """Distance from a mask's bounding box to the nearest tile edge that cuts through the image."""
    th, tw = tile.shape
    far = th + tw  # no cutting edge: as central as it gets
    dist = [far]
    # Only edges facing a neighbour tile cut cells; the image border is a real border.
    if tile.row > 0:
        dist.append(bbox[0].start)
    if tile.row + 1 < grid.n_rows:
        dist.append(th - bbox[0].stop)
    if tile.col > 0:
        dist.append(bbox[1].start)
    if tile.col + 1 < grid.n_cols:
        dist.append(tw - bbox[1].stop)
    return int(min(dist))


def stitch_tiles(grid: TileGrid, tile_labels: Sequence[np.ndarray],
                 iou_threshold: float = SEAM_IOU_THRESHOLD, whole_cells: bool = True
                 ) -> StitchResult:
    """Merge per-tile label images into one: the reference's seam linking, then whole cells.

    whole_cells=False is the reference's stitching alone (each pixel from the tile whose core
    holds it), relabelled 1..n.
    """
    if len(tile_labels) != len(grid):
        raise ValueError(f"expected {len(grid)} tile label images, got {len(tile_labels)}")
    h, w = grid.shape
    tiles = list(grid)
    for t, lab in zip(tiles, tile_labels):
        if lab.shape[:2] != t.shape:
            raise ValueError(f"tile {t.index} labels have shape {lab.shape}, expected {t.shape}")

    # Global ids: tile t's label k becomes offsets[t] + k (0 stays background).
    n_local = np.array([int(lab.max()) if lab.size else 0 for lab in tile_labels], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_local)[:-1]]).astype(np.int64)
    n_ids = int(n_local.sum()) + 1

    # Members: every (tile, label) present, with its bounding box, the pixels it has inside the
    # image (margins past the image border hold wrapped-around content) and inside the core.
    m_gid, m_tile, m_bbox, m_area, m_core = [], [], [], [], []
    for t, lab in zip(tiles, tile_labels):
        n = int(n_local[t.index])
        if n == 0:
            continue
        lab = np.asarray(lab)
        oy, ox = t.origin
        inside = lab[max(-oy, 0):h - oy, max(-ox, 0):w - ox]
        area = np.bincount(inside.ravel(), minlength=n + 1)
        core = np.bincount(lab[t.core].ravel(), minlength=n + 1)
        for k, sl in enumerate(ndimage.find_objects(lab), start=1):
            if sl is None:
                continue
            m_gid.append(offsets[t.index] + k)
            m_tile.append(t.index)
            m_bbox.append(sl)
            m_area.append(area[k])
            m_core.append(core[k])
    if not m_gid:
        return StitchResult(np.zeros((h, w), np.int32), np.zeros((0, 2), np.int64))
    m_gid = np.asarray(m_gid, dtype=np.int64)
    m_tile = np.asarray(m_tile, dtype=np.int64)
    m_area = np.asarray(m_area, dtype=np.int64)
    m_core = np.asarray(m_core, dtype=np.int64)
    m_score = np.array([_centrality(grid, tiles[t], bb) for t, bb in zip(m_tile, m_bbox)],
                       dtype=np.int64)

    # Union-find over the seam links = connected components of the link graph.
    links = np.asarray(seam_links(grid, tile_labels, iou_threshold), dtype=np.int64).reshape(-1, 4)
    i = offsets[links[:, 0]] + links[:, 1]
    j = offsets[links[:, 2]] + links[:, 3]
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n_ids, n_ids))
    _, component = connected_components(graph, directed=False)
    m_comp = component[m_gid]

    # A merged cell exists when some tile holds part of it in its core (as in the reference: a
    # cell seen only in tile margins belongs to another tile, or was not found there).
    comp_core = np.bincount(m_comp, weights=m_core, minlength=n_ids)
    alive = comp_core[m_comp] > 0
    # Group numbers 1..G in order of each group's first member (tile order, then tile label).
    comps, first = np.unique(m_comp[alive], return_index=True)
    comps = comps[np.argsort(first, kind="stable")]
    group_of_comp = np.zeros(n_ids, dtype=np.int64)
    group_of_comp[comps] = np.arange(1, len(comps) + 1)
    n_groups = len(comps)
    group_of_gid = group_of_comp[component]
    group_of_gid[0] = 0
    m_group = group_of_gid[m_gid]

    # Owner of each group: the member that sees most of the cell (the least cut view); ties go
    # to the member farther from a cutting tile edge, then to the earlier tile.
    order = np.lexsort((m_tile, -m_score, -m_area, m_group))
    g_sorted = m_group[order]
    heads = order[np.r_[True, g_sorted[1:] != g_sorted[:-1]]]
    owner = np.full(n_groups + 1, -1, dtype=np.int64)
    owner[m_group[heads]] = heads
    owner[0] = -1
    # Priority between groups, for pixels two cells claim: the larger owner view wins.
    rank = np.zeros(n_groups + 1, dtype=np.int64)
    gi = np.arange(1, n_groups + 1)
    prio = np.lexsort((-gi, m_score[owner[gi]], m_area[owner[gi]]))
    rank[gi[prio]] = np.arange(1, n_groups + 1)

    # 1) The reference's stitching: each pixel from the tile whose core contains it.
    out = np.zeros((h, w), dtype=np.int32)
    for t, lab in zip(tiles, tile_labels):
        core = np.asarray(lab[t.core], dtype=np.int64)
        out[t.y0:t.y1, t.x0:t.x1] = group_of_gid[np.where(core > 0, core + offsets[t.index], 0)]

    keep = np.ones(n_groups + 1, dtype=bool)
    if whole_cells:
        # 2) Paint each owner's whole mask (clipped to the image) over weaker claims.
        windows = [None] * (n_groups + 1)
        for g in gi:
            m = owner[g]
            t = tiles[m_tile[m]]
            bb = m_bbox[m]
            oy, ox = t.origin
            ys, ye = max(bb[0].start + oy, 0), min(bb[0].stop + oy, h)
            xs, xe = max(bb[1].start + ox, 0), min(bb[1].stop + ox, w)
            if ys < ye and xs < xe:
                local = m_gid[m] - offsets[t.index]
                mask = tile_labels[t.index][ys - oy:ye - oy, xs - ox:xe - ox] == local
                windows[g] = ((slice(ys, ye), slice(xs, xe)), mask)
        claimed = np.bincount(out.ravel(), minlength=n_groups + 1).astype(np.int64)
        for g in gi:
            if windows[g] is not None:
                win, mask = windows[g]
                claimed[g] += int(np.count_nonzero(mask & (out[win] != g)))
        for g in gi[np.argsort(rank[gi], kind="stable")]:  # weakest first: strongest paints last
            if windows[g] is None:
                continue
            win, mask = windows[g]
            region = out[win]
            region[mask & (rank[region] < rank[g])] = g
        # 3) A cell left with under half of its claim was a duplicate fragment of a better view.
        kept = np.bincount(out.ravel(), minlength=n_groups + 1)
        keep = kept >= _KEEP_FRACTION * claimed
    present = np.bincount(out.ravel(), minlength=n_groups + 1) > 0
    keep &= present
    keep[0] = False

    new_id = np.zeros(n_groups + 1, dtype=np.int32)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    labels = new_id[out]
    own = owner[np.nonzero(keep)[0]]
    sources = np.stack([m_tile[own], m_gid[own] - offsets[m_tile[own]]], axis=1).astype(np.int64)
    return StitchResult(labels=labels, sources=sources)


def segment_tiled(image: np.ndarray,
                  segment_batch: Callable[[list[np.ndarray]], Sequence[np.ndarray]],
                  block: int = BLOCK_SIZE, overlap: int = OVERLAP, batch_size: int = 4,
                  iou_threshold: float = SEAM_IOU_THRESHOLD, whole_cells: bool = True,
                  progress: Callable[[int, int], None] | None = None,
                  ) -> tuple[StitchResult, TileGrid]:
    """Segment `image` tile by tile (`segment_batch` gets lists of tiles) and merge the seams."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    grid = tile_grid(image.shape, block, overlap)
    tiles = list(grid)
    tile_labels: list[np.ndarray] = []
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start:start + batch_size]
        results = segment_batch([extract_tile(image, t) for t in batch])
        if len(results) != len(batch):
            raise ValueError(f"segment_batch returned {len(results)} label images for "
                             f"{len(batch)} tiles")
        for t, lab in zip(batch, results):
            tile_labels.append(np.asarray(lab))
            if progress is not None:
                progress(t.index + 1, len(tiles))
    return stitch_tiles(grid, tile_labels, iou_threshold, whole_cells), grid


def median_area_fraction(labels: np.ndarray) -> float:
    """Median cell area as a fraction of the image (NaN without cells), the reference's tiling gauge."""
    areas = np.bincount(np.asarray(labels).ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    if areas.size == 0:
        return float("nan")
    return float(np.median(areas) / labels.size)


def tiles_add_resolution(shape: Sequence[int]) -> bool:
    """Whether tiling can show the model most of this image at a finer scale than the whole-image
    pass (the condition for `tile="auto"` to re-segment, tiled).

    Tiles are resized to the model input just as the whole image is. In an image no larger than
    one tile, the first tile holds the 400-px block and is no smaller than the image along either
    axis, so most cells are seen at the whole-image scale again; only the remainder strips are
    enlarged, stretched along one axis, with wrap-around content beside them. On the default
    model this re-segmentation cost several passes and lowered F1 (docs/performance.md)."""
    return max(int(shape[0]), int(shape[1])) > TILE_SIZE
