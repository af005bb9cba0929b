"""Images read region by region, never whole: OME-Zarr images (or a plate's field), plain zarr
arrays and TIFF files (tiled or not, through tifffile's zarr view of the file).

`open_lazy(path)` reads metadata only; `LazyImage.region(ys, xs)` reads the pixels of one
rectangle as YX or YXC. A LazyImage pickles as its description (path, level, planes) and opens the
array again where it is unpickled, so it can be sent to Dask workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cellsam_rt.errors import ImageReadError
from cellsam_rt.io.images import CHANNEL_AXES, TIFF_EXTENSIONS
from cellsam_rt.io.ngff import NgffError, NgffImage, is_ngff_store, iter_images


@dataclass
class LazyImage:
    """One 2-D image (with or without channels) of an array on disk, read region by region."""

    key: str                          # what error lines and tables call it
    kind: str                         # "ngff", "zarr" or "tiff"
    path: Path                        # the store or file
    axes: str                         # upper-case axes of the stored array, e.g. CYX, TCZYX, YXS
    shape: tuple[int, ...]            # the stored array's shape
    dtype: str
    planes: dict = field(default_factory=dict)   # index of each axis other than Y, X, channel
    ngff: NgffImage | None = None     # the OME-Zarr image (labels go next to it)
    level: int = 0                    # TIFF pyramid level / NGFF level

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_array", None)  # reopened where it is used
        return state

    @property
    def height(self) -> int:
        return self.shape[self.axes.index("Y")]

    @property
    def width(self) -> int:
        return self.shape[self.axes.index("X")]

    @property
    def channel_axis(self) -> str | None:
        found = [a for a in self.axes if a in CHANNEL_AXES and a not in self.planes]
        return found[0] if found else None

    @property
    def n_channels(self) -> int:
        c = self.channel_axis
        return self.shape[self.axes.index(c)] if c else 1

    def array(self):
        """The zarr (or zarr-like) array, opened once per process."""
        arr = self.__dict__.get("_array")
        if arr is None:
            arr = self.__dict__["_array"] = _open_array(self)
        return arr

    def region(self, ys: slice, xs: slice) -> np.ndarray:
        """Pixels of rows `ys` and columns `xs` as YX (one channel) or YXC."""
        index: list[Any] = []
        kept = ""
        for ax in self.axes:
            if ax == "Y":
                index.append(ys)
            elif ax == "X":
                index.append(xs)
            elif ax == self.channel_axis:
                index.append(slice(None))
            else:
                index.append(self.planes.get(ax, 0))
                continue
            kept += ax
        try:
            data = np.asarray(self.array()[tuple(index)])
        except Exception as exc:  # a missing or corrupt chunk / tile
            raise ImageReadError(self.key, f"cannot read pixels ({type(exc).__name__}: "
                                           f"{exc})") from exc
        order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept)
                                                      if a not in "YX"]
        data = np.transpose(data, order)
        if data.ndim == 3 and data.shape[2] == 1:
            data = data[..., 0]
        return np.ascontiguousarray(data)


def _open_array(im: LazyImage):
    import zarr

    try:
        if im.kind == "ngff":
            return im.ngff.array()
        if im.kind == "zarr":
            return zarr.open_array(str(im.path), mode="r")
        import tifffile

        return zarr.open_array(tifffile.imread(im.path, aszarr=True, level=im.level), mode="r")
    except (ImageReadError, NgffError):
        raise
    except Exception as exc:
        raise ImageReadError(im.path, f"cannot open for reading ({type(exc).__name__}: "
                                      f"{exc})") from exc


def _pick_planes(key: str, axes: str, shape: tuple, planes: Mapping[str, int]) -> dict:
    """Indices of the axes other than Y, X and one channel axis; length-1 axes need none."""
    planes = {k.upper(): int(v) for k, v in (planes or {}).items()}
    unknown = set(planes) - set(axes)
    if unknown:
        raise ImageReadError(key, f"--plane names axes {''.join(sorted(unknown))} that are not "
                                  f"in {axes}")
    if "Y" not in axes or "X" not in axes:
        raise ImageReadError(key, f"axes {axes} must include Y and X")
    channel = None
    for ax, n in zip(axes, shape):
        if ax in "YX" or ax in planes:
            continue
        if ax in CHANNEL_AXES and (channel is None or n > 1):
            if channel is not None and shape[axes.index(channel)] > 1:
                raise ImageReadError(key, f"axes {axes} hold two channel axes with several "
                                          "entries each")
            if channel is not None:
                planes[channel] = 0
            channel = ax
        elif n == 1:
            planes[ax] = 0
        else:
            raise ImageReadError(key, f"axis {ax} has {n} planes (axes {axes}, shape {shape}); "
                                      f"pick one with --plane {ax}=INDEX")
    for ax, i in planes.items():
        n = shape[axes.index(ax)]
        if not -n <= i < n:
            raise ImageReadError(key, f"plane {ax}={i} out of range (axis {ax} has {n} planes)")
    return planes


def lazy_from_ngff(image: NgffImage, planes: Mapping[str, int] | None = None) -> LazyImage:
    """A LazyImage of one OME-Zarr image (its selected level)."""
    axes = image.axes.upper()
    return LazyImage(key=image.key, kind="ngff", path=image.store, axes=axes, shape=image.shape,
                     dtype=image.dtype, ngff=image, level=image.level,
                     planes=_pick_planes(image.key, axes, image.shape, planes or {}))


def open_lazy(path: "str | Path", level: int = 0, planes: Mapping[str, int] | None = None,
              axes: str | None = None) -> LazyImage:
    """Open an OME-Zarr image (or plate field), a zarr array or a TIFF file for region reads.

    Only metadata is read. Errors are one line naming the path (ImageReadError / NgffError).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file or folder")
    if is_ngff_store(path) or (path / ".zarray").is_file() or (path / "zarr.json").is_file():
        return _open_zarr(path, level, planes, axes)
    if path.suffix.lower() in TIFF_EXTENSIONS:
        return _open_tiff(path, level, planes, axes)
    raise ImageReadError(path, "not an image larger than memory can be read from (expected an "
                               "OME-Zarr image, a zarr array or a TIFF file)")


def _open_zarr(path: Path, level: int, planes, axes: str | None) -> LazyImage:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise ImageReadError(path, f"unreadable zarr store ({exc})") from exc
    if isinstance(node, zarr.Array):
        shape = tuple(int(n) for n in node.shape)
        names = (axes or {2: "YX", 3: "CYX"}.get(len(shape), "")).upper()
        if len(names) != len(shape):
            raise ImageReadError(path, f"zarr array of shape {shape}: give its axes with --axes")
        return LazyImage(key=str(path), kind="zarr", path=path, axes=names, shape=shape,
                         dtype=str(node.dtype), planes=_pick_planes(str(path), names, shape,
                                                                    planes or {}))
    images = list(iter_images(path, level=level))
    if len(images) != 1:
        raise ImageReadError(path, f"holds {len(images)} images; give the path of one image "
                                   "(for a plate: plate.zarr/ROW/COLUMN/FIELD)")
    if isinstance(images[0], NgffError):
        raise images[0]
    return lazy_from_ngff(images[0], planes)


def _open_tiff(path: Path, level: int, planes, axes: str | None) -> LazyImage:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ImageReadError(path, "corrupt or unreadable TIFF: no image data in it")
            series = tif.series[0]
            if not 0 <= level < len(series.levels):
                raise ImageReadError(path, f"level {level} not in the file (levels 0-"
                                           f"{len(series.levels) - 1})")
            page = series.levels[level]
            shape, names, dtype = tuple(page.shape), page.axes.upper(), str(page.dtype)
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise ImageReadError(path, f"corrupt or unreadable TIFF: {exc or type(exc).__name__}") \
            from exc
    if axes:
        if len(axes) != len(shape):
            raise ImageReadError(path, f"axes {axes!r} name {len(axes)} dimensions but the "
                                       f"image has {len(shape)} (shape {shape})")
        names = axes.upper()
    return LazyImage(key=str(path), kind="tiff", path=path, axes=names, shape=shape, dtype=dtype,
                     level=level, planes=_pick_planes(str(path), names, shape, planes or {}))


def plane_pixels(path: "str | Path") -> int:
    """Y x X pixels of a TIFF's first image (metadata only); 0 when it cannot be told."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return int(series.shape[series.axes.index("Y")] * series.shape[series.axes.index("X")])
    except Exception:  # noqa: BLE001 - unreadable files are reported when they are read
        return 0


__all__ = ["LazyImage", "lazy_from_ngff", "open_lazy", "plane_pixels"]
