"""Reading label images (TIFF/OME-TIFF, OME-Zarr labels) with their pixel size, if recorded.

A label image here is 2-D and integer-valued: 0 = background, n > 0 = cell n. Singleton axes
(T=1, C=1, Z=1) are dropped; anything else that is not YX is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from .images import ImageReadError

# Factors from a length unit's name (OME-XML or NGFF spelling) to micrometres.
_TO_UM = {"µm": 1.0, "um": 1.0, "micrometer": 1.0, "micrometre": 1.0, "micron": 1.0,
          "microns": 1.0, "\\u00B5m": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
          "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "cm": 1e4, "centimeter": 1e4,
          "m": 1e6, "meter": 1e6, "metre": 1e6}


@dataclass(frozen=True)
class LabelImage:
    """A 2-D label image and where its pixels lie in physical space.

    `pixel_size` is µm per pixel (None when the file does not say); `origin_um` is the physical
    (y, x) position of the centre of pixel (0, 0) (NGFF translation; (0, 0) otherwise).
    """

    labels: np.ndarray
    pixel_size: float | None = None
    origin_um: tuple[float, float] = (0.0, 0.0)


def is_zarr_path(path: str | Path) -> bool:
    """True for a folder holding zarr metadata (v2 .zgroup/.zarray or v3 zarr.json)."""
    path = Path(path)
    return path.is_dir() and any((path / n).exists() for n in ("zarr.json", ".zgroup", ".zarray"))


def read_label_image(path: str | Path) -> LabelImage:
    """Read a TIFF or OME-Zarr label image; raises ImageReadError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file or folder")
    if is_zarr_path(path):
        node, axes, pixel_size, origin = _open_zarr(path)
        try:
            arr = node[...]
        except Exception as exc:  # noqa: BLE001 - unreadable chunks: a bad input
            raise ImageReadError(path, f"cannot read OME-Zarr labels: {exc}") from None
    elif path.suffix.lower() in (".tif", ".tiff"):
        arr, axes, pixel_size = _read_tiff(path)
        origin = (0.0, 0.0)
    else:
        raise ImageReadError(path, "label images must be TIFF files or OME-Zarr folders")
    labels = _as_2d(np.asarray(arr), axes, path)
    _check_labels(labels, path)
    return LabelImage(labels, pixel_size, origin)


def read_pixel_size(path: str | Path) -> tuple[float | None, tuple[float, float]]:
    """(µm per pixel or None, (y, x) origin in µm) from a TIFF's or OME-Zarr's metadata."""
    path = Path(path)
    if is_zarr_path(path):
        return _open_zarr(path)[2:]
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        try:
            with tifffile.TiffFile(path) as tif:
                return _tiff_pixel_size(tif, path), (0.0, 0.0)
        except ImageReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
            raise ImageReadError(path, f"cannot read TIFF: {exc}") from None
    return None, (0.0, 0.0)


def _as_2d(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Drop singleton non-YX axes; refuse stacks."""
    axes = axes.upper() if axes and len(axes) == arr.ndim else ""
    if not axes:  # no usable axis names: the last two axes are Y, X
        axes = "Q" * (arr.ndim - 2) + "YX"
    extra = [i for i, a in enumerate(axes) if a not in "YX"]
    if any(arr.shape[i] != 1 for i in extra) or arr.ndim < 2:
        raise ImageReadError(path, f"label image must be 2-D (YX), got shape {arr.shape} "
                                   f"with axes {axes}")
    return arr.reshape([arr.shape[i] for i, a in enumerate(axes) if a in "YX"])


def _check_labels(labels: np.ndarray, path: Path) -> None:
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ImageReadError(path, f"not a label image: pixel type {labels.dtype}, expected "
                                   "integers (0 = background, n = cell n)")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ImageReadError(path, "label image has negative values")


# -- TIFF --------------------------------------------------------------------------------------

def _read_tiff(path: Path) -> tuple[np.ndarray, str, float | None]:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr, axes = series.asarray(), series.axes
            pixel_size = _tiff_pixel_size(tif, path)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise ImageReadError(path, f"cannot read TIFF: {exc}") from None
    return arr, axes, pixel_size


def _tiff_pixel_size(tif: tifffile.TiffFile, path: Path) -> float | None:
    """µm per pixel from OME-XML PhysicalSizeX/Y, else from an ImageJ file's resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        image = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
        pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})
        sizes = [_in_um(pixels.get(f"PhysicalSize{a}"), pixels.get(f"PhysicalSize{a}Unit", "µm"))
                 for a in "XY"]
        return _isotropic(sizes, path)
    if tif.is_imagej and (tif.imagej_metadata or {}).get("unit"):
        page = tif.pages[0]
        sizes = []
        for tag in ("XResolution", "YResolution"):
            num, den = page.tags[tag].value if tag in page.tags else (0, 1)
            sizes.append(_in_um(den / num if num else None, tif.imagej_metadata["unit"]))
        return _isotropic(sizes, path)
    return None


def _in_um(value, unit) -> float | None:
    if value is None:
        return None
    factor = _TO_UM.get(str(unit).strip().lower() if unit else "µm")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value * factor if factor is not None and value > 0 else None


def _isotropic(sizes: list[float | None], path: Path) -> float | None:
    """One size for X and Y (either may be missing); refuse clearly different ones."""
    known = [s for s in sizes if s is not None]
    if not known:
        return None
    if max(known) > min(known) * (1 + 1e-3):
        raise ImageReadError(path, f"pixels are not square ({sizes[0]} x {sizes[1]} µm); "
                                   "spot assignment needs square pixels")
    return known[0]


# -- OME-Zarr ----------------------------------------------------------------------------------

def _zarr_attrs(group) -> dict:
    attrs = dict(group.attrs)
    return attrs.get("ome", attrs)  # NGFF 0.5 nests everything under "ome"


def _open_zarr(path: Path):
    """(zarr array of level 0, axes, µm per pixel or None, (y, x) origin in µm)."""
    """Level 0 of a multiscales group (a label, or an image), or a bare zarr array.

    An image with exactly one label under labels/ (or that labels/ folder) means that label.
    """
    import zarr  # optional dependency: only for OME-Zarr inputs

    try:
        node = zarr.open(str(path), mode="r")
        if isinstance(node, zarr.Array):
            return node, "", None, (0.0, 0.0)
        attrs = _zarr_attrs(node)
        # The labels/ folder itself, or an image with labels/: its one label is meant.
        if "labels" in attrs or "labels" in node:
            names, base = ((list(attrs["labels"]), path) if "labels" in attrs else
                           (list(_zarr_attrs(node["labels"]).get("labels", [])), path / "labels"))
            if len(names) != 1:
                raise ImageReadError(path, f"{len(names)} labels listed here; give one label's "
                                     "folder" + (f": {', '.join(str(base / n) for n in names)}"
                                                 if names else ""))
            return _open_zarr(base / names[0])
        if "multiscales" not in attrs:
            raise ImageReadError(path, "no OME-Zarr multiscales metadata here")
        ms = attrs["multiscales"][0]
        level0 = ms["datasets"][0]
        arr = node[level0["path"]]
        axes_meta = ms.get("axes") or []
        names = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
        axes = "".join(n[0].upper() for n in names) if len(names) == arr.ndim else ""
        pixel_size, origin = _ngff_scale(axes_meta, names, ms, level0, path)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed store or metadata: a bad input
        raise ImageReadError(path, f"cannot read OME-Zarr labels: {exc}") from None
    return arr, axes, pixel_size, origin


def _ngff_scale(axes_meta, names, ms, level0, path) -> tuple[float | None, tuple[float, float]]:
    """µm per pixel and the (y, x) origin from level 0's scale/translation (and the global ones).

    Only axes with a spatial unit give a pixel size: NGFF writers fill in scale 1 by default.
    """
    scale = np.ones(len(names))
    shift = np.zeros(len(names))
    for transforms in (level0.get("coordinateTransformations", []),
                       ms.get("coordinateTransformations", [])):
        for t in transforms:
            if t.get("type") == "scale" and len(t.get("scale", [])) == len(names):
                shift *= np.asarray(t["scale"], float)  # global transforms apply after level 0's
                scale *= np.asarray(t["scale"], float)
            elif t.get("type") == "translation" and len(t.get("translation", [])) == len(names):
                shift += np.asarray(t["translation"], float)
    if "y" not in names or "x" not in names:
        return None, (0.0, 0.0)
    iy, ix = names.index("y"), names.index("x")
    units = [axes_meta[i].get("unit") if isinstance(axes_meta[i], dict) else None
             for i in (ix, iy)]
    if not all(units):
        return None, (0.0, 0.0)
    factors = [_TO_UM.get(str(u).lower()) for u in units]
    if None in factors:
        return None, (0.0, 0.0)
    size = _isotropic([scale[ix] * factors[0], scale[iy] * factors[1]], path)
    return size, (float(shift[iy] * factors[1]), float(shift[ix] * factors[0]))


__all__ = ["LabelImage", "is_zarr_path", "read_label_image", "read_pixel_size"]
