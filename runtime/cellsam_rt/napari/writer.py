"""napari writer: corrected labels saved back in a run's formats, `<name>_labels.tif` plus a
`<name>_cells.csv` recomputed from the labels (each file written atomically).

The table is recomputed from the pixels, so edits show in area, centroid and bounding box.
Detection scores stay with their label. Mean intensities are recomputed when the labels layer
knows its image (layers made by the Segment widget); otherwise a cell keeps its old intensities
only if its area, centroid and bounding box are unchanged, and an edited or new cell gets NaN.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import tifffile

from cellsam_rt.io import atomic_write, output_stem, write_labels_tiff, write_table_csv
from cellsam_rt.stages.postprocess import cell_table

__all__ = ["run_name", "save_labels", "write_labels"]

_GEOMETRY = ("area", "centroid_y", "centroid_x", "bbox_min_row", "bbox_min_col",
             "bbox_max_row", "bbox_max_col")


def run_name(path: "str | Path") -> str:
    """The run name of a target path: `out/img_labels.tif` -> `img`, `out/img.tif` -> `img`."""
    name = Path(path).name
    low = name.lower()
    for suffix in ("_labels.tif", "_labels.tiff"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return output_stem(name)


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer hook for Labels layers."""
    image = (meta.get("metadata") or {}).get("cellsam_rt", {}).get("image")
    paths = save_labels(Path(path).parent, run_name(path), np.asarray(data),
                        meta.get("features"), image)
    return [str(p) for p in paths]


def save_labels(folder: "str | Path", name: str, labels: np.ndarray,
                features: Optional[pd.DataFrame] = None,
                image: Optional[np.ndarray] = None) -> list[Path]:
    """Write `<name>_labels.tif` and `<name>_cells.csv` into `folder`; returns both paths.

    A stack (planes, Y, X) is one multi-page TIFF and its table gains `plane_0` columns.
    """
    folder = Path(folder)
    labels = np.asarray(labels)
    if labels.ndim < 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{folder / name}_labels.tif: expected integer labels, got "
                         f"{labels.dtype} of shape {labels.shape}")
    old = _by_label(features)
    frames = []
    lead = labels.shape[:-2]
    for index in np.ndindex(*lead):
        plane_image = None if image is None else np.asarray(image[index])
        if plane_image is not None and plane_image.shape[:2] != labels.shape[-2:]:
            plane_image = None  # not this layer's image (e.g. resized since)
        table = cell_table(labels[index], plane_image)
        frame = pd.DataFrame({c: table[c] for c in table.dtype.names})
        for k, p in enumerate(index):
            frame.insert(1 + k, f"plane_{k}", p)
        frames.append(_carry_over(frame, old, have_image=plane_image is not None))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    labels_path = folder / f"{name}_labels.tif"
    if labels.ndim == 2:
        write_labels_tiff(labels_path, labels)
    else:
        out = labels.astype(np.uint16 if labels.max(initial=0) <= 65535 else np.uint32)
        atomic_write(labels_path, lambda fh: tifffile.imwrite(
            fh, out, compression="zlib", photometric="minisblack", metadata=None))
    rows = table.to_records(index=False)
    table_path = write_table_csv(folder / f"{name}_cells.csv", rows)
    return [labels_path, table_path]


def _by_label(features) -> Optional[pd.DataFrame]:
    """The old features indexed by label value (None when there are none)."""
    if features is None or len(features) == 0:
        return None
    frame = pd.DataFrame(features)
    key = "index" if "index" in frame else "label" if "label" in frame else None
    if key is None:
        return None
    return frame.drop_duplicates(key).set_index(key)


def _carry_over(frame: pd.DataFrame, old: Optional[pd.DataFrame], have_image: bool) -> pd.DataFrame:
    """Scores by label; old intensities for cells whose geometry did not change."""
    labels = frame["label"].to_numpy()
    if old is None:
        return frame
    known = np.isin(labels, old.index.to_numpy())
    prev = old.reindex(labels)
    if "score" in old:
        frame["score"] = np.where(known, prev["score"].to_numpy(dtype=np.float64), np.nan)
    if have_image:
        return frame
    same = known.copy()
    for col in _GEOMETRY:
        if col in old:
            same &= np.isclose(prev[col].to_numpy(dtype=np.float64),
                               frame[col].to_numpy(dtype=np.float64))
    for col in [c for c in old.columns if str(c).startswith("mean_intensity_")]:
        frame[col] = np.where(same, prev[col].to_numpy(dtype=np.float64), np.nan)
    return frame
