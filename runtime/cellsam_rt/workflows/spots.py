"""Spatial transcriptomics: assign RNA spots to cells, from files to result files.

`assign_spots_for_run` is the whole step for a label image in memory (what `cellsam-rt run
--spots` calls); `segment_density` segments a density image rendered from the spots, for data
without a stain. The maths lives in `spot_assignment` (re-exported here).

Outputs, each written atomically and only after every check passed:
  <stem>_spots.csv (.parquet for Parquet input)  the usable input rows plus a `cell` column
  <stem>_cells.h5ad                               AnnData: cells x genes counts, cell table
  <stem>_counts.csv                               the same counts as a dense table
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write
from ..io.label_images import read_pixel_size
from .spot_assignment import (
    MAX_BAD_FRACTION,
    MAX_OUTSIDE_FRACTION,
    PARQUET_SUFFIXES,
    SpotAssignment,
    Spots,
    SpotsError,
    assign_labels,
    assign_spots,
    count_matrix,
    expand_labels,
    format_summary,
    label_stats,
    pixel_index,
    prepare_spots,
    read_spots_table,
    render_density,
)

COUNTS_CSV_ROWS = 4096  # cells per block when writing the dense counts CSV
MAX_DENSITY_PIXELS = 20_000 * 20_000

Progress = Callable[[str], None]


def is_parquet(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(PARQUET_SUFFIXES)


def output_paths(out_dir: str | Path, stem: str, parquet: bool = False) -> dict[str, Path]:
    """The files `write_spot_outputs` writes, by kind."""
    out_dir = Path(out_dir)
    return {"spots": out_dir / f"{stem}_spots.{'parquet' if parquet else 'csv'}",
            "cells": out_dir / f"{stem}_cells.h5ad",
            "counts": out_dir / f"{stem}_counts.csv"}


def write_spot_outputs(result: SpotAssignment, out_dir: str | Path, stem: str, *,
                       parquet: bool = False, counts_csv: bool = True) -> list[Path]:
    """Write the spots table, the .h5ad and (unless counts_csv=False) the dense counts CSV."""
    paths = output_paths(out_dir, stem, parquet)
    adata = result.to_anndata()  # built first: a failure here leaves no file behind
    table = result.spots
    if parquet:
        atomic_write(paths["spots"], lambda fh: table.to_parquet(fh, index=False))
    else:
        atomic_write(paths["spots"], lambda fh: write_frame_csv(fh, table))
    # anndata writes by file name; the temporary file atomic_write opened is that name.
    atomic_write(paths["cells"], lambda fh: adata.write_h5ad(fh.name))
    written = [paths["spots"], paths["cells"]]
    if counts_csv:
        atomic_write(paths["counts"], lambda fh: write_counts_csv(fh, result))
        written.append(paths["counts"])
    return written


def _csv_options():
    import pyarrow.csv as pcsv

    return pcsv.WriteOptions(quoting_style="needed")


def write_frame_csv(fh, table) -> None:
    """A DataFrame as CSV through Arrow's writer (several times faster than pandas' for floats,
    and floats round-trip exactly)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.Table.from_pandas(table, preserve_index=False), fh,
                   write_options=_csv_options())


def write_counts_csv(fh, result: SpotAssignment, rows: int = COUNTS_CSV_ROWS) -> None:
    """Dense cells x genes CSV (`cell` = label id first), densified a block of cells at a time."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    ids = result.obs["label"].to_numpy(np.int64)
    names = ["cell", *result.genes]
    schema = pa.schema([pa.field(n, pa.int64() if i == 0 else pa.int32())
                        for i, n in enumerate(names)])
    with pcsv.CSVWriter(fh, schema, write_options=_csv_options()) as writer:
        for start in range(0, len(ids), rows):
            block = result.counts[start:start + rows].toarray()
            arrays = [pa.array(ids[start:start + rows])]
            arrays += [pa.array(block[:, j]) for j in range(block.shape[1])]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))


def resolve_pixel_size(pixel_size: float | str | None, image_path: str | Path | None = None
                       ) -> tuple[float | None, tuple[float, float]]:
    """(µm per pixel, origin) for spots in microns; (None, (0, 0)) for spots in pixels.

    pixel_size "auto" reads it from the image's metadata (OME-TIFF PhysicalSizeX, ImageJ
    resolution, NGFF scale); a number is used as given, with the image's NGFF origin if any.
    """
    if pixel_size is None:
        return None, (0.0, 0.0)
    meta, origin = read_pixel_size(image_path) if image_path is not None else (None, (0.0, 0.0))
    if pixel_size == "auto":
        if meta is None:
            raise SpotsError(image_path or "image", "no pixel size in the image's metadata; "
                                                    "give --pixel-size UM (µm per pixel)")
        return meta, origin
    value = float(pixel_size)
    if not value > 0:
        raise SpotsError(image_path or "image", f"pixel size must be > 0, got {pixel_size}")
    return value, origin


def assign_spots_for_run(labels: np.ndarray, spots_path: str | Path, out_dir: str | Path,
                         stem: str, pixel_size: float | str | None = None,
                         expand: float | None = None, expand_units: str = "px", *,
                         image_path: str | Path | None = None, allow_outside: bool = False,
                         columns: Mapping[str, str] | None = None, counts_csv: bool = True,
                         progress: Progress | None = None) -> dict[str, Any]:
    """Read a spots table, assign its spots to `labels`' cells, write the three outputs.

    pixel_size: None = spot coordinates are pixels of `labels`; a number = microns at that many
    µm per pixel; "auto" = microns, pixel size from `image_path`'s metadata. Returns the summary
    (spots, assigned, background, outside, dropped, cells, cells_without_spots, genes) plus
    `outputs` (paths written) and `warnings` (lines for the user, e.g. dropped rows).
    Raises SpotsError (one line) for an unusable table; then nothing is written.
    """
    step = progress or (lambda name: None)
    size, origin = resolve_pixel_size(pixel_size, image_path)
    step("read spots")
    table = read_spots_table(spots_path)
    spots = prepare_spots(table, spots_path, pixel_size=size, origin_um=origin, columns=columns)
    step("assign")
    result = assign_spots(labels, spots, spots_path, pixel_size=size, expand=expand,
                          expand_units=expand_units, allow_outside=allow_outside)
    step("write")
    written = write_spot_outputs(result, out_dir, stem, parquet=is_parquet(spots_path),
                                 counts_csv=counts_csv)
    return {**result.summary, "outputs": [str(p) for p in written],
            "warnings": spot_warnings(result, spots_path)}


def spot_warnings(result: SpotAssignment, source: str | Path) -> list[str]:
    """Lines worth a user's attention: dropped rows, spots outside the image."""
    s, out = result.summary, []
    if s["dropped"]:
        out.append(f"{source}: {s['dropped']} of {s['spots']} rows dropped (no usable x, y or "
                   "gene)")
    if s["outside"]:
        out.append(f"{source}: {s['outside']} spots lie outside the label image (not assigned)")
    if not s["cells"]:
        out.append(f"{source}: the label image has no cells")
    return out + [f"{source}: {note}" for note in result.notes]


def segment_density(spots: Spots, segmenter, sigma: float = 1.0, source: str | Path = "spots"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Render the spots' density (on the pixel grid of `spots`' coordinates) and segment it.

    Returns (density image float32, labels). `spots` positions must already be in density
    pixels (prepare_spots with pixel_size = the density pixel size); the image starts at
    coordinate 0, so spots at negative coordinates lie outside it.
    """
    h = int(max(pixel_index(spots.row).max(initial=0), 0)) + 1
    w = int(max(pixel_index(spots.col).max(initial=0), 0)) + 1
    if h * w > MAX_DENSITY_PIXELS:
        raise SpotsError(source, f"the density image would be {w}x{h} pixels; "
                                 "raise --density-pixel-size")
    density = render_density(spots.col, spots.row, (h, w), pixel_size=1.0, sigma=sigma)
    labels = segmenter.segment(density).labels
    return density, labels


def segment_spots_for_run(spots_path: str | Path, out_dir: str | Path, stem: str,
                          segmenter: Any = "default",
                          density_pixel_size: float = 1.0, sigma: float = 1.0,
                          expand: float | None = None, expand_units: str = "px", *,
                          allow_outside: bool = False, columns: Mapping[str, str] | None = None,
                          counts_csv: bool = True, progress: Progress | None = None
                          ) -> dict[str, Any]:
    """Segment cells from the spots alone (no stain), then assign the spots to them.

    The density image has `density_pixel_size` spot-coordinate units (usually µm) per pixel;
    "um" in expand_units means those units. Also writes <stem>_density.tif (float32) and
    <stem>_labels.tif next to the usual outputs. Returns the summary as assign_spots_for_run.
    `segmenter` is a Segmenter, or a model name/directory for one made once the table passed
    its checks.
    """
    import tifffile

    from ..io import write_labels_tiff

    step = progress or (lambda name: None)
    if not density_pixel_size > 0:
        raise SpotsError(spots_path, f"density pixel size must be > 0, got {density_pixel_size}")
    step("read spots")
    table = read_spots_table(spots_path)
    spots = prepare_spots(table, spots_path, pixel_size=density_pixel_size, columns=columns)
    step("segment density")
    if isinstance(segmenter, (str, Path)):
        from ..pipeline import Segmenter

        segmenter = Segmenter(model=segmenter)
    density, labels = segment_density(spots, segmenter, sigma, spots_path)
    step("assign")
    result = assign_spots(labels, spots, spots_path, pixel_size=density_pixel_size,
                          expand=expand, expand_units=expand_units, allow_outside=allow_outside,
                          outside_hint="spots at negative coordinates lie outside the density "
                                       "image")
    step("write")
    out_dir = Path(out_dir)
    atomic_write(out_dir / f"{stem}_density.tif", lambda fh: tifffile.imwrite(
        fh, density, photometric="minisblack", metadata=None))
    write_labels_tiff(out_dir / f"{stem}_labels.tif", labels)
    written = [out_dir / f"{stem}_density.tif", out_dir / f"{stem}_labels.tif"]
    written += write_spot_outputs(result, out_dir, stem, parquet=is_parquet(spots_path),
                                  counts_csv=counts_csv)
    return {**result.summary, "outputs": [str(p) for p in written],
            "warnings": spot_warnings(result, spots_path)}


__all__ = [
    "MAX_BAD_FRACTION",
    "MAX_OUTSIDE_FRACTION",
    "SpotAssignment",
    "Spots",
    "SpotsError",
    "assign_labels",
    "assign_spots",
    "assign_spots_for_run",
    "count_matrix",
    "expand_labels",
    "format_summary",
    "is_parquet",
    "label_stats",
    "output_paths",
    "pixel_index",
    "prepare_spots",
    "read_spots_table",
    "render_density",
    "resolve_pixel_size",
    "segment_density",
    "segment_spots_for_run",
    "spot_warnings",
    "write_counts_csv",
    "write_frame_csv",
    "write_spot_outputs",
]
