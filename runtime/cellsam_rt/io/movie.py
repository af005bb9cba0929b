"""Time-lapse input: a TYX / TCYX (OME-)TIFF, an OME-Zarr image with a t axis, or a folder of frames.

`open_movie` checks the input and returns a `Movie` that hands out one frame at a time (YX, or
YXC with channels last), so a long movie is segmented without holding all of it as floats.
Axes come from the file's metadata (OME-TIFF, ImageJ, OME-Zarr) or from `axes`; a 3-D stack
without axis names is read as TYX. A folder's images are the frames in natural name order
(frame2 before frame10); a CTC ground-truth folder (TRA/man_track*.tif) is read as labels.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tifffile

from . import ImageReadError, is_image_file, read_image

_GENERIC = "IQS"  # tifffile's names for pages / unknown axes


def natural_key(path: Path) -> list:
    """Sort key putting frame2 before frame10."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", path.name)]


@dataclass
class Movie:
    """Frames of a time-lapse, read on demand."""

    source: Path
    n_frames: int
    frame_shape: tuple[int, ...]  # (Y, X) or (Y, X, C)
    _read: Callable[[int], np.ndarray]
    names: Optional[list[str]] = None  # per-frame file names (folders)

    def frame(self, t: int) -> np.ndarray:
        return self._read(t)

    def where(self, t: int) -> str:
        return f"{self.source / self.names[t]}" if self.names else f"{self.source} (frame {t})"


def open_movie(path: "str | Path", axes: Optional[str] = None, labels: bool = False) -> Movie:
    """Open a time-lapse; ImageReadError (one line naming the file) when it is not one."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file or folder")
    if path.is_dir():
        if (path / "zarr.json").is_file() or (path / ".zattrs").is_file():
            return _open_zarr(path, axes)
        return _open_folder(path, axes, labels)
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise ImageReadError(path, "expected a TIFF/OME-TIFF stack, an OME-Zarr image or a "
                                   "folder of frames")
    return _open_tiff(path, axes)


def _to_tyx(arr, names: str, path: Path, where: str = ""):
    """Reorder to T, Y, X[, C]; refuse inputs without a time axis or with a real Z axis."""
    names = names.upper()
    if len(names) != arr.ndim:
        raise ImageReadError(path, f"axes {names!r} do not match the {arr.ndim}-D data of shape "
                                   f"{tuple(arr.shape)}")
    if arr.ndim == 3 and "T" not in names and names[0] in _GENERIC:
        names = "T" + names[1:]  # a plain stack of 2-D images
    if "T" not in names:
        raise ImageReadError(path, f"track needs a time axis (axes {names}{where}, shape "
                                   f"{tuple(arr.shape)}); give --axes, e.g. TYX")
    if "Y" not in names or "X" not in names:
        raise ImageReadError(path, f"axes {names} lack Y or X")
    keep = "TYX" + ("C" if "C" in names else "")
    for i, a in reversed(list(enumerate(names))):
        if a not in keep:
            if arr.shape[i] != 1:
                raise ImageReadError(path, f"axis {a} has {arr.shape[i]} planes; track works "
                                           "on 2-D frames over time (T, Y, X and channels C)")
            arr = arr[(slice(None),) * i + (0,)]
            names = names[:i] + names[i + 1:]
    order = [names.index(a) for a in keep]
    return arr.transpose(order)  # numpy or dask


def _open_tiff(path: Path, axes: Optional[str]) -> Movie:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            names = axes or series.axes
            arr = series.asarray()
    except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds for broken files
        raise ImageReadError(path, f"cannot read TIFF: {exc}") from exc
    if arr.ndim == 2:
        raise ImageReadError(path, f"track needs a time axis: a single 2-D image of shape "
                                   f"{arr.shape}")
    arr = _to_tyx(arr, names, path)
    return Movie(path, arr.shape[0], tuple(arr.shape[1:]), lambda t: np.asarray(arr[t]))


def _open_zarr(path: Path, axes: Optional[str]) -> Movie:
    try:
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader

        location = parse_url(str(path))
        if location is None:
            raise ImageReadError(path, "not an OME-Zarr store")
        node = next(iter(Reader(location)()))
        data = node.data[0]  # level 0 (full resolution), a dask array
        names = axes or "".join(a["name"] if isinstance(a, dict) else a
                                for a in node.metadata.get("axes", []))
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds for broken stores
        raise ImageReadError(path, f"cannot read OME-Zarr image: {exc}") from exc
    if not names:
        names = "TYX" if data.ndim == 3 else ""
    arr = _to_tyx(data, names, path)
    return Movie(path, int(arr.shape[0]), tuple(int(s) for s in arr.shape[1:]),
                 lambda t: np.asarray(arr[t].compute()))


def _open_folder(path: Path, axes: Optional[str], labels: bool) -> Movie:
    files = sorted((p for p in path.iterdir() if p.is_file() and is_image_file(p)),
                   key=natural_key)
    if not files and labels and (path / "TRA").is_dir():
        return _open_folder(path / "TRA", axes, labels)  # CTC ground truth
    if not files:
        raise ImageReadError(path, "folder contains no image frames")
    if labels:
        files = [f for f in files if f.suffix.lower() in (".tif", ".tiff")] or files
    read = (lambda f: _read_label_frame(f)) if labels else (lambda f: read_image(f, axes=axes))
    first = read(files[0])
    if first.ndim not in (2, 3):
        raise ImageReadError(files[0], f"frame of shape {first.shape}: expected a 2-D image")
    shape = first.shape

    def frame(t: int) -> np.ndarray:
        img = first if t == 0 else read(files[t])
        if img.shape != shape:
            raise ImageReadError(files[t], f"frame shape {img.shape} differs from the first "
                                           f"frame's {shape} ({files[0].name})")
        return img

    return Movie(path, len(files), tuple(shape), frame, [f.name for f in files])


def _read_label_frame(path: Path) -> np.ndarray:
    try:
        arr = tifffile.imread(path) if path.suffix.lower() in (".tif", ".tiff") else \
            read_image(path)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(path, f"cannot read label image: {exc}") from exc
    return np.squeeze(arr) if arr.ndim > 2 else arr


def as_labels(stack: np.ndarray, where: "str | Path") -> np.ndarray:
    """A label stack as unsigned integers; ImageReadError for fractional or negative values."""
    stack = np.asarray(stack)
    if not np.issubdtype(stack.dtype, np.integer):
        if not np.issubdtype(stack.dtype, np.floating) or not np.all(np.mod(stack, 1) == 0):
            raise ImageReadError(where, f"labels must be whole numbers, got {stack.dtype} "
                                        "values with fractions (is this an image rather than "
                                        "labels? drop --labels to segment it)")
    if stack.size and stack.min() < 0:
        raise ImageReadError(where, "labels must not be negative")
    top = int(stack.max()) if stack.size else 0
    return stack.astype(np.uint16 if top <= 65535 else np.uint32, copy=False)
