"""Spot assignment maths: RNA spots to the cells of a label image, genes counted per cell.

Coordinates. A spot's x is a column, y a row, as in scikit-image and napari: the centre of pixel
(row i, column j) lies at (y, x) = (i, j) and the pixel covers [i - 0.5, i + 0.5) x
[j - 0.5, j + 0.5). A spot therefore lies in row floor(y + 0.5), column floor(x + 0.5); a spot
exactly on a border belongs to the pixel below/right of it (x = 3.5 -> column 4). Spots in
microns are first divided by the pixel size (µm per pixel) after subtracting the image's origin
(the physical position of pixel (0, 0)'s centre; 0 unless an NGFF translation says otherwise).

Everything is vectorised: one fancy-indexing lookup assigns all spots, bincounts over the label
image give areas and centroids, and a COO -> CSR conversion sums the cell x gene counts.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

MAX_OUTSIDE_FRACTION = 0.05  # more spots outside the image than this: likely wrong units
MAX_BAD_FRACTION = 0.05  # more unusable rows than this: likely a wrong file or column
MAX_BAD_ROWS = 10  # ... unless there are at most this many (a small table's few typos)
EXPAND_TILE = 4096  # expansion works on tiles of this size (plus a halo) to bound memory
DENSE_IDS = 2**24  # label ids below this index per-label arrays directly (128 MiB each at most)
DEFAULT_COLUMNS = {"x": "x", "y": "y", "gene": "gene"}
PARQUET_SUFFIXES = (".parquet", ".pq")


class SpotsError(ValueError):
    """A spots table (or its combination with a label image) that cannot be used.

    str() is one line: "<file>: <problem>".
    """

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), " ".join(str(reason).split())
        super().__init__(f"{path}: {self.reason}")


# -- reading and checking the table -------------------------------------------------------------

def read_spots_table(path: str | Path) -> pd.DataFrame:
    """Read a spots table: Parquet (.parquet/.pq) or delimited text (CSV; .tsv/.txt by tabs)."""
    path = Path(path)
    if not path.is_file():
        raise SpotsError(path, "no such file")
    name = path.name.lower()
    try:
        if name.endswith(PARQUET_SUFFIXES):
            return pd.read_parquet(path)
        sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")) else ","
        try:  # Arrow's parser: multi-threaded, exact floats
            return pd.read_csv(path, sep=sep, engine="pyarrow")
        except Exception:  # noqa: BLE001 - pandas' own parser copes with more (and says more)
            return pd.read_csv(path, sep=sep, low_memory=False)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad input file
        raise SpotsError(path, f"cannot read the spots table: {exc}") from None


@dataclass
class Spots:
    """The usable rows of a spots table, with their positions in label-image pixels."""

    table: pd.DataFrame  # the input's usable rows, all columns as read
    row: np.ndarray  # float64 pixel coordinates (y)
    col: np.ndarray  # float64 pixel coordinates (x)
    gene_codes: np.ndarray  # int64 index into genes
    genes: list[str]
    n_total: int  # rows in the input
    n_dropped: int  # rows dropped: missing/non-numeric coordinates or gene


def _gene_names(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def prepare_spots(table: pd.DataFrame, source: str | Path = "spots", *,
                  pixel_size: float | None = None, origin_um: tuple[float, float] = (0.0, 0.0),
                  columns: Mapping[str, str] | None = None,
                  max_bad_fraction: float = MAX_BAD_FRACTION) -> Spots:
    """Check the table and convert positions to pixels; a few bad rows are dropped (counted)."""
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    missing = [cols[k] for k in ("x", "y", "gene") if cols[k] not in table.columns]
    if missing:
        shown = ", ".join(map(str, list(table.columns)[:12]))
        raise SpotsError(source, f"missing column(s) {', '.join(missing)} (columns: {shown}); "
                                 "name them with --columns x=...,y=...,gene=...")
    n = len(table)
    if n == 0:
        raise SpotsError(source, "the spots table has no rows")
    coords = {}
    for key in ("x", "y"):
        values = pd.to_numeric(table[cols[key]], errors="coerce").to_numpy(np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            first = table[cols[key]].iloc[0]
            raise SpotsError(source, f"column {cols[key]} has no numbers (first value {first!r})")
        coords[key] = values
    codes, uniques = pd.factorize(table[cols["gene"]], use_na_sentinel=True)
    names = np.asarray(_gene_names(uniques), dtype=object)
    # Merge genes whose names coincide as text (e.g. b"ACTB" and "ACTB"), sort by name.
    genes, inverse = np.unique(names.astype(str), return_inverse=True)
    codes = np.where(codes >= 0, inverse[np.maximum(codes, 0)], -1).astype(np.int64)
    empty = np.flatnonzero(np.char.strip(genes.astype(str)) == "")
    good = np.isfinite(coords["x"]) & np.isfinite(coords["y"]) & (codes >= 0)
    if empty.size:
        good &= ~np.isin(codes, empty)
    n_bad = int(n - good.sum())
    if n_bad > max_bad_fraction * n and n_bad > MAX_BAD_ROWS:
        raise SpotsError(source, f"{n_bad} of {n} rows have no usable x, y or gene "
                                 f"(more than {max_bad_fraction:.0%}); check the columns")
    if n_bad:
        keep = np.flatnonzero(good)
        table = table.iloc[keep]
        codes = codes[keep]
        coords = {k: v[keep] for k, v in coords.items()}
        used = np.unique(codes)  # genes only seen on dropped rows disappear
        genes, codes = genes[used], np.searchsorted(used, codes)
    x, y = coords["x"], coords["y"]
    if pixel_size is not None:
        if not pixel_size > 0:
            raise SpotsError(source, f"pixel size must be > 0, got {pixel_size}")
        x = (x - origin_um[1]) / pixel_size
        y = (y - origin_um[0]) / pixel_size
    return Spots(table, y, x, codes, [str(g) for g in genes], n, n_bad)


# -- assignment ---------------------------------------------------------------------------------

def pixel_index(coord: np.ndarray) -> np.ndarray:
    """The pixel holding each coordinate: pixel i covers [i - 0.5, i + 0.5)."""
    return np.floor(np.asarray(coord, np.float64) + 0.5).astype(np.int64)


def assign_labels(labels: np.ndarray, row: np.ndarray, col: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Label under each position (0 = background or outside) and whether it lies in the image."""
    r, c = pixel_index(row), pixel_index(col)
    h, w = labels.shape
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    cell = np.zeros(r.shape, np.int64)
    cell[inside] = labels[r[inside], c[inside]]
    return cell, inside


def expand_labels(labels: np.ndarray, distance: float, tile: int = EXPAND_TILE) -> np.ndarray:
    """Grow every label by `distance` pixels into background, never into another label.

    scikit-image's expand_labels on overlapping tiles: a pixel's nearest label lies within
    `distance`, so a halo of ceil(distance) + 1 pixels gives each tile's core the same answer as
    the whole image (up to ties between equidistant labels) with memory bounded by the tile.
    """
    from skimage.segmentation import expand_labels as _expand

    if distance <= 0:
        return labels
    h, w = labels.shape
    if h <= tile and w <= tile:
        return _expand(labels, distance)
    halo = math.ceil(distance) + 1
    out = np.empty_like(labels)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            a, b = max(y0 - halo, 0), max(x0 - halo, 0)
            grown = _expand(labels[a:min(y1 + halo, h), b:min(x1 + halo, w)], distance)
            out[y0:y1, x0:x1] = grown[y0 - a:y1 - a, x0 - b:x1 - b]
    return out


def label_stats(labels: np.ndarray, rows_per_block: int = 1024
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Label ids present (sorted), their areas (pixels) and centroids (y, x) in pixels.

    Bincounts over blocks of rows: no full-image coordinate arrays (800 MB each at 10k x 10k).
    """
    top = int(labels.max()) if labels.size else 0
    if top >= DENSE_IDS:  # huge ids: compact them first (a sort of the image, slower)
        ids, inverse = np.unique(labels, return_inverse=True)
        compact = inverse.reshape(labels.shape)
        area, cy, cx = _block_sums(compact, len(ids), rows_per_block)
        keep = ids > 0
        return ids[keep], area[keep], cy[keep], cx[keep]
    area, sy, sx = _block_sums(labels, top + 1, rows_per_block)
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]
    return ids, area[ids], sy[ids] / area[ids], sx[ids] / area[ids]


def _block_sums(labels: np.ndarray, n: int, block: int):
    area = np.zeros(n, np.int64)
    sy, sx = np.zeros(n), np.zeros(n)
    w = labels.shape[1]
    xs = np.arange(w, dtype=np.float64)
    for y0 in range(0, labels.shape[0], block):
        part = labels[y0:y0 + block]
        flat = part.ravel().astype(np.intp, copy=False)
        area += np.bincount(flat, minlength=n)
        ys = np.repeat(np.arange(y0, y0 + part.shape[0], dtype=np.float64), w)
        sy += np.bincount(flat, weights=ys, minlength=n)
        sx += np.bincount(flat, weights=np.tile(xs, part.shape[0]), minlength=n)
    return area, sy, sx


def count_matrix(cell_rows: np.ndarray, gene_codes: np.ndarray, n_cells: int, n_genes: int
                 ) -> sp.csr_matrix:
    """Cells x genes counts (CSR, int32) from each assigned spot's cell row and gene code."""
    data = np.ones(len(cell_rows), np.int32)
    coo = sp.coo_matrix((data, (cell_rows, gene_codes)), shape=(n_cells, n_genes))
    csr = coo.tocsr()  # sums duplicate (cell, gene) pairs
    csr.sum_duplicates()
    return csr


# -- the whole step -----------------------------------------------------------------------------

@dataclass
class SpotAssignment:
    """Per-spot cells, the cell x gene matrix and the cell table, before anything is written."""

    spots: pd.DataFrame  # the usable input rows plus a `cell` column (0 = none)
    counts: sp.csr_matrix  # cells x genes
    obs: pd.DataFrame  # one row per label present, index = label id as text
    genes: list[str]
    summary: dict[str, Any]
    uns: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # things the user should hear about

    def to_anndata(self):
        """AnnData: X = counts, obs = cells, var = genes, obsm['spatial'] = centroid (x, y) px."""
        import anndata

        obs = self.obs
        adata = anndata.AnnData(X=self.counts, obs=obs, var=pd.DataFrame(index=self.genes))
        adata.obsm["spatial"] = obs[["centroid_x", "centroid_y"]].to_numpy(np.float64)
        adata.uns["cellsam_rt"] = {k: v for k, v in self.uns.items() if v is not None}
        return adata


def assign_spots(labels: np.ndarray, spots: pd.DataFrame | Spots, source: str | Path = "spots",
                 *, pixel_size: float | None = None, origin_um: tuple[float, float] = (0.0, 0.0),
                 expand: float | None = None, expand_units: str = "px",
                 allow_outside: bool = False, columns: Mapping[str, str] | None = None,
                 cell_column: str = "cell", outside_hint: str | None = None) -> SpotAssignment:
    """Assign spots to the cells of a 2-D label image and count genes per cell (nothing written).

    `pixel_size` (µm per pixel) says the spot coordinates are microns; None means pixels.
    `expand` grows the cells first, in pixels or (expand_units="um") microns.
    Raises SpotsError when more than 5% of the spots fall outside the image (unless
    `allow_outside`): usually coordinates in other units than assumed.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer image, got {labels.shape} {labels.dtype}")
    if not isinstance(spots, Spots):
        spots = prepare_spots(spots, source, pixel_size=pixel_size, origin_um=origin_um,
                              columns=columns)
    expand_px = _expand_pixels(expand, expand_units, pixel_size, source)
    if expand_px:
        labels = expand_labels(labels, expand_px)
    cell, inside = assign_labels(labels, spots.row, spots.col)
    n = len(cell)
    n_outside = int(n - inside.sum())
    if n_outside > MAX_OUTSIDE_FRACTION * n and not allow_outside:
        raise SpotsError(source, _outside_message(spots, labels.shape, n_outside, pixel_size,
                                                  outside_hint))
    ids, area, cy, cx = label_stats(labels)
    hit = cell > 0
    counts = count_matrix(_matrix_rows(ids, cell[hit]), spots.gene_codes[hit], ids.size,
                          len(spots.genes))
    n_spots = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    obs = pd.DataFrame({"label": ids.astype(np.int64), "area": area.astype(np.int64),
                        "centroid_y": cy, "centroid_x": cx, "n_spots": n_spots},
                       index=pd.Index(ids.astype(str), name="cell"))
    if pixel_size is not None:
        obs["area_um2"] = obs["area"] * pixel_size ** 2
    notes = ([f"its column {cell_column!r} is replaced by the cell ids in the output"]
             if cell_column in spots.table.columns else [])
    table = spots.table.assign(**{cell_column: cell})
    summary = {"spots": spots.n_total, "assigned": int(hit.sum()),
               "background": int((inside & ~hit).sum()), "outside": n_outside,
               "dropped": spots.n_dropped, "cells": int(ids.size),
               "cells_without_spots": int((n_spots == 0).sum()), "genes": len(spots.genes)}
    uns = {"pixel_size_um": pixel_size, "expand_px": expand_px or 0.0,
           "coordinates": "obsm['spatial'] = centroid (x, y) in label-image pixels"}
    return SpotAssignment(table, counts, obs, spots.genes, summary, uns, notes)


def _matrix_rows(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Row of each label in the matrix (`ids` sorted, holding every label that occurs)."""
    if ids.size and ids[-1] <= 4 * ids.size + 2**20:  # a lookup table fits: one gather
        lookup = np.zeros(int(ids[-1]) + 1, np.int64)
        lookup[ids] = np.arange(ids.size)
        return lookup[labels]
    return np.searchsorted(ids, labels)  # sparse huge ids (or none at all)


def _expand_pixels(expand, units, pixel_size, source) -> float:
    if not expand:
        return 0.0
    if expand < 0:
        raise SpotsError(source, f"--expand must be >= 0, got {expand}")
    if units == "um":
        if pixel_size is None:
            raise SpotsError(source, "--expand in microns needs the pixel size (--pixel-size)")
        return float(expand) / pixel_size
    if units != "px":
        raise ValueError(f"expand_units must be 'px' or 'um', got {units!r}")
    return float(expand)


def _outside_message(spots: Spots, shape, n_outside: int, pixel_size, hint=None) -> str:
    n = len(spots.row)
    ext = (f"spots span x {spots.col.min():.1f}..{spots.col.max():.1f}, "
           f"y {spots.row.min():.1f}..{spots.row.max():.1f} px")
    hint = hint or ("check --pixel-size (µm per pixel)" if pixel_size is not None else
            "coordinates in microns? give --pixel-size UM")
    return (f"{n_outside} of {n} spots ({n_outside / n:.0%}) lie outside the {shape[1]}x"
            f"{shape[0]} label image ({ext}); {hint}, or --allow-outside to count them as "
            "unassigned")


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line: how many spots went where."""
    s = summary
    line = (f"{s['spots']} spots: {s['assigned']} in {s['cells']} cells, {s['background']} in "
            f"background, {s['outside']} outside the image")
    if s["dropped"]:
        line += f", {s['dropped']} bad rows dropped"
    return line + f"; {s['cells_without_spots']} cells without spots, {s['genes']} genes"


# -- density image (segmenting from spots) ------------------------------------------------------

def render_density(x: np.ndarray, y: np.ndarray, shape: tuple[int, int] | None = None,
                   pixel_size: float = 1.0, sigma: float = 1.0) -> np.ndarray:
    """Gaussian-blurred 2-D histogram of spot positions, float32, for segmenting without a stain.

    Positions are in the spots' units; the image has `pixel_size` units per pixel, with the
    pixel convention of this module (pixel i centred on i * pixel_size). `shape` defaults to
    just enough pixels for every spot at non-negative coordinates. `sigma` is in image pixels.
    """
    col = pixel_index(np.asarray(x, np.float64) / pixel_size)
    row = pixel_index(np.asarray(y, np.float64) / pixel_size)
    if shape is None:
        shape = (int(max(row.max(initial=0), 0)) + 1, int(max(col.max(initial=0), 0)) + 1)
    h, w = shape
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    hist = np.bincount(row[inside] * w + col[inside], minlength=h * w)
    image = hist.reshape(h, w).astype(np.float32)
    if sigma > 0:
        from scipy.ndimage import gaussian_filter

        image = gaussian_filter(image, sigma=sigma, mode="constant")
    return image
