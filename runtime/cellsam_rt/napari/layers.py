"""Between napari layers and arrays: planes of an image layer, boxes from a Shapes layer, cell
tables as Labels features, and box masks merged into existing labels."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

__all__ = ["boxes_by_plane", "current_plane_index", "drop_rows", "features_frame",
           "image_plane", "merge_new_labels", "plane_shape", "spatial_shape"]


def _base_data(layer):
    """The full-resolution array of an image layer (first level of a multiscale one)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def plane_shape(layer) -> tuple[int, ...]:
    """Sizes of the axes that index planes (time points, z): all but Y, X (and RGB)."""
    data = _base_data(layer)
    n_lead = data.ndim - (3 if layer.rgb else 2)
    return tuple(int(s) for s in data.shape[:n_lead])


def spatial_shape(layer) -> tuple[int, ...]:
    """Shape of a Labels layer that overlays the image layer (planes, Y, X)."""
    data = _base_data(layer)
    return tuple(int(s) for s in data.shape[: data.ndim - (1 if layer.rgb else 0)])


def image_plane(layer, index: Sequence[int]) -> np.ndarray:
    """One plane of an image layer as a numpy YX (or YXC for RGB) array."""
    return np.asarray(_base_data(layer)[tuple(int(i) for i in index)])


def current_plane_index(layer, point: Sequence[float]) -> tuple[int, ...]:
    """The plane of `layer` that the viewer shows at world position `point`."""
    lead = plane_shape(layer)
    if not lead:
        return ()
    coords = layer.world_to_data(point)
    return tuple(int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(coords[: len(lead)], lead))


def boxes_by_plane(shapes_layer, image_layer, indices: Iterable[int]) -> dict:
    """Rectangles `indices` of a Shapes layer as xyxy boxes in the image's pixels, by plane.

    Vertices go through world coordinates, so layers with different scales still line up.
    Returns {plane index tuple: [(shape index, xyxy), ...]}.
    """
    lead = plane_shape(image_layer)
    out: dict = {}
    for i in indices:
        if shapes_layer.shape_type[i] != "rectangle":
            continue
        verts = np.asarray(shapes_layer.data[i], dtype=np.float64)
        world = np.array([shapes_layer.data_to_world(v) for v in verts])
        pix = np.array([image_layer.world_to_data(w) for w in world])
        rows, cols = pix[:, -2], pix[:, -1]
        plane = tuple(int(np.clip(round(float(c)), 0, n - 1))
                      for c, n in zip(pix[0, : len(lead)], lead))
        box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32)
        out.setdefault(plane, []).append((i, box))
    return out


def features_frame(table: np.ndarray, plane: Sequence[int] = ()) -> pd.DataFrame:
    """A cell table as a Labels `features` frame; its `index` column (the label) lets napari show
    a cell's row on hover. `plane` adds the plane's index (plane_0, plane_1, ...)."""
    frame = pd.DataFrame({name: table[name] for name in table.dtype.names})
    frame.insert(0, "index", frame["label"].to_numpy())
    for k, p in enumerate(plane):
        frame.insert(2 + k, f"plane_{k}", np.full(len(frame), int(p), dtype=np.int64))
    return frame


def merge_new_labels(labels: np.ndarray, new: np.ndarray, start: int) -> tuple[np.ndarray, list]:
    """Paste the cells of `new` into `labels` as ids start, start+1, ... without overwriting
    existing cells (pixels only where `labels` is 0); a cell left with no pixel is dropped.

    Returns the merged labels (dtype widened when needed) and the ids given.
    """
    given: list[int] = []
    new = np.asarray(new)
    ids = [int(v) for v in np.unique(new) if v]
    top = start + len(ids)
    if top > np.iinfo(labels.dtype).max:
        labels = labels.astype(np.uint32 if top <= np.iinfo(np.uint32).max else np.uint64)
    nxt = start
    # Each cell is handled inside its bounding box only (large images, few boxes).
    spans = ndimage.find_objects(new.astype(np.intp, copy=False))
    for v in ids:
        where = spans[v - 1]
        sel = (new[where] == v) & (labels[where] == 0)
        if not sel.any():
            continue
        labels[where][sel] = nxt
        given.append(nxt)
        nxt += 1
    return labels, given


def drop_rows(frame: Optional[pd.DataFrame], keep_labels: np.ndarray) -> pd.DataFrame:
    """Rows of a features frame whose label is still in `keep_labels`."""
    if frame is None or "index" not in frame:
        return pd.DataFrame()
    return frame[np.isin(frame["index"].to_numpy(), keep_labels)].reset_index(drop=True)
