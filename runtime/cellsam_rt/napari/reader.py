"""napari readers for cellsam-rt's outputs and inputs.

- a run's output folder (or one `<name>_labels.tif`): Labels layers whose features are the
  `<name>_cells.csv` rows, so hovering a cell shows its area, score and intensities;
- a tracking result folder (or its `tracks.csv`): a Tracks layer (data `[track_id, t, y, x]`,
  graph `{track_id: [parent]}`) and the `mask*.tif` frames as one Labels stack;
- an image file, read as `cellsam-rt run` reads it (OME-TIFF axes, NPY, PNG/JPEG).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import tifffile

from cellsam_rt.io import ImageReadError, is_image_file, output_stem, read_image

__all__ = ["get_reader", "read_image_layers", "read_run", "read_tracks"]

LABELS_SUFFIXES = ("_labels.tif", "_labels.tiff")
TRACKS_COLUMNS = ("track_id", "t", "y", "x", "area", "parent_track_id")
_MASK_RE = re.compile(r"^mask(\d+)\.tiff?$", re.IGNORECASE)

LayerData = list[tuple]


def _labels_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.lower().endswith(LABELS_SUFFIXES))


def _run_name(labels_path: Path) -> str:
    name = labels_path.name
    return name[: name.lower().rfind("_labels")]


def get_reader(path) -> Optional[Callable[..., LayerData]]:
    """npe2 reader hook: a reader function for `path`, or None when it is not ours."""
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    if not paths:
        return None
    readers = [_reader_for(p) for p in paths]
    if any(r is None for r in readers):
        return None

    def read(_path) -> LayerData:
        return [layer for r, p in zip(readers, paths) for layer in r(p)]
    return read


def _reader_for(path: Path):
    if path.is_dir():
        if (path / "tracks.csv").is_file():
            return read_tracks
        if _labels_files(path):
            return read_run
        return None
    name = path.name.lower()
    if name == "tracks.csv":
        return lambda p: read_tracks(p.parent)
    if name.endswith(LABELS_SUFFIXES):
        return read_run
    if is_image_file(path):
        return read_image_layers
    return None


def read_run(path: "str | Path") -> LayerData:
    """A run folder (every `<name>_labels.tif`) or one labels file, with its `<name>_cells.csv`."""
    path = Path(path)
    files = _labels_files(path) if path.is_dir() else [path]
    layers = []
    for labels_path in files:
        name = _run_name(labels_path)
        labels = tifffile.imread(labels_path)
        meta = {"name": f"{name} cells",
                "metadata": {"cellsam_rt": {"run_dir": str(labels_path.parent), "name": name}}}
        table_path = labels_path.parent / f"{name}_cells.csv"
        if table_path.is_file():
            frame = pd.read_csv(table_path)
            if "label" in frame:
                frame.insert(0, "index", frame["label"].to_numpy())
            meta["features"] = frame
        layers.append((labels, meta, "labels"))
    return layers


def read_tracks(folder: "str | Path") -> LayerData:
    """A tracking result folder: Tracks layer from `tracks.csv`, Labels stack from `mask*.tif`."""
    folder = Path(folder)
    table_path = folder / "tracks.csv"
    frame = pd.read_csv(table_path)
    missing = [c for c in TRACKS_COLUMNS if c not in frame]
    if missing:
        raise ValueError(f"{table_path}: missing columns {', '.join(missing)} "
                         f"(expected {', '.join(TRACKS_COLUMNS)})")
    frame = frame.sort_values(["track_id", "t"], kind="stable").reset_index(drop=True)
    data = frame[["track_id", "t", "y", "x"]].to_numpy(dtype=np.float64)
    parents = (frame[frame["parent_track_id"] != 0]
               .drop_duplicates("track_id")[["track_id", "parent_track_id"]])
    graph = {int(k): [int(p)] for k, p in parents.itertuples(index=False)}
    features = frame.drop(columns=["y", "x"])
    layers: LayerData = []
    masks = sorted((p for p in folder.iterdir() if p.is_file() and _MASK_RE.match(p.name)),
                   key=lambda p: int(_MASK_RE.match(p.name).group(1)))
    if masks:
        stack = np.stack([tifffile.imread(p) for p in masks])
        layers.append((stack, {"name": f"{folder.name} masks"}, "labels"))
    layers.append((data, {"name": f"{folder.name} tracks", "graph": graph, "features": features,
                          "tail_length": 10}, "tracks"))
    return layers


def read_image_layers(path: "str | Path") -> LayerData:
    """One image as `cellsam-rt run` reads it; a small trailing axis (<= 4) shows as channels.

    A TIFF stack that `run` refuses (named axes such as TCYX or ZYX) opens as a stack with one
    layer per channel, so that the widget can segment its planes.
    """
    path = Path(path)
    try:
        arr = read_image(path)
    except ImageReadError as exc:
        stack = _tiff_stack(path)
        if stack is None:
            raise ValueError(str(exc)) from exc
        return stack
    meta: dict = {"name": output_stem(path)}
    if arr.ndim == 3 and arr.shape[-1] <= 4 and arr.shape[-1] < min(arr.shape[:2]):
        if arr.shape[-1] in (3, 4) and arr.dtype == np.uint8:
            meta["rgb"] = True
        else:
            meta["channel_axis"] = arr.ndim - 1
            meta["name"] = [f"{output_stem(path)} [{c}]" for c in range(arr.shape[-1])]
    return [(arr, meta, "image")]


def _tiff_stack(path: Path) -> Optional[LayerData]:
    """The first series of a TIFF with its named axes (C split into layers), or None."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr, axes = series.asarray(), series.axes.upper()
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can read: keep the original error
        return None
    if arr.ndim < 3 or not axes.endswith("YX") or len(axes) != arr.ndim:
        return None
    meta: dict = {"name": output_stem(path)}
    if "C" in axes or "S" in axes:
        c = axes.index("C" if "C" in axes else "S")
        meta["channel_axis"] = c
        meta["name"] = [f"{output_stem(path)} [{k}]" for k in range(arr.shape[c])]
    return [(arr, meta, "image")]
