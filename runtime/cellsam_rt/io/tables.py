"""The run's per-object table: one Parquet part per image, combined into cells.parquet (+ .h5ad).

Each part is written atomically as soon as its image is done, so a crash loses at most the image
being processed; `combine` concatenates the parts of the finished images in run order.
"""
from __future__ import annotations

import hashlib
import io as _io
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cellsam_rt.io import atomic_write

KEY_COLUMNS = ("plate", "row", "column", "field", "file")
TABLE_NAME = "cells.parquet"
ANNDATA_NAME = "cells.h5ad"
PARTS_DIR = "parts"
INTENSITY_PREFIX = "mean_intensity_"


def object_table(cells: np.ndarray, keys: Mapping[str, Any],
                 channel_names: Sequence[str] = (),
                 pixel_size: tuple[float, float] | None = None):
    """One pyarrow row per object: the image's keys, label, centroid, area, bbox, score, intensities.

    `cells` is a Segmenter result's table (structured array). Intensity columns are named after
    the channels when names are known (mean_intensity_DAPI), else by index (mean_intensity_0).
    `pixel_size` (y, x) in micrometres adds area_um2 (and centroids in micrometres).
    """
    import pyarrow as pa

    n = len(cells)
    cols: dict[str, Any] = {}
    for k in KEY_COLUMNS:
        v = keys.get(k)
        cols[k] = pa.array([None if v is None else str(v)] * n, type=pa.string())
    names = cells.dtype.names or ()
    intensity = [c for c in names if c.startswith(INTENSITY_PREFIX)]
    for c in names:
        if c in intensity:
            continue
        cols[c] = pa.array(cells[c])
        if c == "area":
            um2 = (cells["area"] * (pixel_size[0] * pixel_size[1])) if pixel_size else \
                np.full(n, np.nan)
            cols["area_um2"] = pa.array(np.asarray(um2, np.float64))
    for i, c in enumerate(intensity):
        idx = int(c[len(INTENSITY_PREFIX):])
        label = channel_names[idx] if idx < len(channel_names) and channel_names[idx] else str(idx)
        cols[f"{INTENSITY_PREFIX}{label}"] = pa.array(cells[c])
    return pa.table(cols)


def part_name(key: str) -> str:
    """A file name for an image's part: readable, and unique through a hash of the full key."""
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[-60:].strip("._") or "image"
    return f"{tail}-{digest}.parquet"


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = _io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_part(run_dir: "str | Path", key: str, table) -> Path:
    """Write one image's rows as <run_dir>/parts/<name>.parquet, atomically."""
    parts = Path(run_dir) / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    data = _parquet_bytes(table)
    return atomic_write(parts / part_name(key), lambda fh: fh.write(data))


def read_part(run_dir: "str | Path", key: str):
    import pyarrow.parquet as pq

    return pq.read_table(Path(run_dir) / PARTS_DIR / part_name(key))


def combine(run_dir: "str | Path", keys: Iterable[str], anndata: bool = False) -> Path | None:
    """Concatenate the parts of `keys` (in that order) into cells.parquet (and cells.h5ad)."""
    import pyarrow as pa

    run_dir = Path(run_dir)
    tables = [read_part(run_dir, k) for k in keys
              if (run_dir / PARTS_DIR / part_name(k)).is_file()]
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    data = _parquet_bytes(table)
    out = atomic_write(run_dir / TABLE_NAME, lambda fh: fh.write(data))
    if anndata:
        write_anndata(run_dir / ANNDATA_NAME, table)
    return out


def write_anndata(path: "str | Path", table) -> Path:
    """cells.h5ad: obs = objects (keys, geometry, score), X = mean intensity per channel."""
    import anndata as ad
    import pandas as pd

    df = table.to_pandas()
    xcols = [c for c in df.columns if c.startswith(INTENSITY_PREFIX)]
    obs = df.drop(columns=xcols)
    obs.index = pd.Index([f"{i}" for i in range(len(obs))], dtype=str)
    for k in KEY_COLUMNS:
        if k in obs:
            obs[k] = obs[k].astype("category")
    var = pd.DataFrame(index=pd.Index([c[len(INTENSITY_PREFIX):] for c in xcols], dtype=str))
    x = df[xcols].to_numpy(np.float32) if xcols else np.zeros((len(df), 0), np.float32)
    adata = ad.AnnData(X=x, obs=obs, var=var)
    path = Path(path)

    def write(fh) -> None:
        adata.write_h5ad(fh.name)  # h5py writes by name; atomic_write renames it afterwards

    return atomic_write(path, write)


__all__ = ["ANNDATA_NAME", "KEY_COLUMNS", "PARTS_DIR", "TABLE_NAME", "combine", "object_table",
           "part_name", "read_part", "write_anndata", "write_part"]
