"""OME-Zarr (NGFF 0.4 / 0.5) input and label output: single images, multiscale images, HCS plates.

Reading is lazy: a store is walked through its metadata only and yields one `NgffImage` per image
(per field of a plate); pixels are read when `NgffImage.read()` is called, one field at a time.
Label images are written by `ngff_labels.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from cellsam_rt.errors import CellsamRtError

SUPPORTED_VERSIONS = ("0.4", "0.5")
SPATIAL = ("y", "x")


class NgffError(CellsamRtError):
    """A store, well or field that cannot be used; str() is one line naming it and the problem."""

    def __init__(self, where: "str | Path", reason: str):
        self.where = str(where)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{where}: {self.reason}")


# -- metadata --------------------------------------------------------------------------------

def is_ngff_store(path: "str | Path") -> bool:
    """True for a folder that is a zarr group (v2 or v3), i.e. a candidate OME-Zarr store."""
    p = Path(path)
    return p.is_dir() and ((p / "zarr.json").is_file() or (p / ".zgroup").is_file()
                           or (p / ".zattrs").is_file())


def ome_attrs(attrs: Mapping[str, Any]) -> tuple[dict, str | None]:
    """The NGFF attributes of a group and their version (0.5 nests them under "ome")."""
    attrs = dict(attrs)
    if "ome" in attrs:
        ome = dict(attrs["ome"])
        return ome, str(ome.get("version")) if ome.get("version") is not None else None
    version = None
    for key in ("multiscales", "plate", "well"):
        meta = attrs.get(key)
        if isinstance(meta, list) and meta:
            meta = meta[0]
        if isinstance(meta, dict) and meta.get("version") is not None:
            version = str(meta["version"])
            break
    return attrs, version


def _check_version(version: str | None, where: str) -> None:
    if version is None:
        return  # some writers omit it on wells/images; the store's version decides
    if version not in SUPPORTED_VERSIONS:
        raise NgffError(where, f"unsupported NGFF version {version} (supported: "
                               f"{', '.join(SUPPORTED_VERSIONS)})")


def _open_group(store: Path, path: str = "", mode: str = "r"):
    import zarr

    try:
        root = zarr.open_group(str(store), mode=mode)
        return root[path] if path else root
    except KeyError:
        raise NgffError(location(store, path), "missing (not in the store)") from None
    except Exception as exc:  # zarr raises several types for damaged metadata
        raise NgffError(location(store, path), f"unreadable zarr group: {exc}") from exc


def location(store: Path, path: str) -> str:
    return f"{store}/{path}" if path else str(store)


# -- one image -------------------------------------------------------------------------------

@dataclass
class NgffImage:
    """One image of a store (a field of a plate, or the store's own image), read lazily."""

    store: Path
    path: str                      # group path inside the store ("" for a single image)
    version: str                   # "0.4" or "0.5"
    axes: str                      # e.g. "cyx", "tczyx"
    level: int                     # pyramid level read (0 = full resolution)
    levels: int                    # number of levels in the image's pyramid
    array_path: str                # the level's array, relative to the image group
    shape: tuple[int, ...]
    dtype: str
    scale: tuple[float, ...]       # the level's scale, one value per axis
    translation: tuple[float, ...] = ()  # the level's translation (lower levels are offset)
    units: dict[str, str] = field(default_factory=dict)
    channel_names: tuple[str, ...] = ()
    plate: str | None = None
    row: str | None = None
    column: str | None = None
    field: str | None = None

    @property
    def key(self) -> str:
        """A stable name of this image: the store's path plus the group path."""
        return location(self.store, self.path)

    @property
    def pixel_size(self) -> tuple[float, float] | None:
        """(y, x) pixel size in micrometres when the axes say so, else None."""
        sizes = []
        for ax in SPATIAL:
            unit = self.units.get(ax, "")
            factor = _MICROMETRES.get(unit)
            if factor is None:
                return None
            sizes.append(self.scale[self.axes.index(ax)] * factor)
        return sizes[0], sizes[1]

    @property
    def n_channels(self) -> int:
        return self.shape[self.axes.index("c")] if "c" in self.axes else 1

    def array(self):
        """The level's zarr array (lazy: nothing is read yet)."""
        import zarr

        try:
            return zarr.open_array(str(self.store), path=join_path(self.path, self.array_path),
                                   mode="r")
        except Exception as exc:
            raise NgffError(self.key, f"cannot open array {self.array_path}: {exc}") from exc

    def read(self, planes: Mapping[str, int] | None = None) -> np.ndarray:
        """Pixels of this image as YX or YXC (all channels); other axes need one plane each."""
        planes = {k.lower(): int(v) for k, v in (planes or {}).items()}
        index: list[Any] = []
        for ax, n in zip(self.axes, self.shape):
            if ax in SPATIAL or ax == "c":
                index.append(slice(None))
            elif ax in planes:
                if not -n <= planes[ax] < n:
                    raise NgffError(self.key, f"plane {ax.upper()}={planes[ax]} out of range "
                                              f"(axis {ax} has {n} planes)")
                index.append(planes[ax])
            elif n == 1:
                index.append(0)
            else:
                raise NgffError(self.key, f"axis {ax} has {n} planes (axes {self.axes}); pick "
                                          f"one with --plane {ax.upper()}=INDEX")
        try:
            data = np.asarray(self.array()[tuple(index)])
        except NgffError:
            raise
        except Exception as exc:  # a missing or corrupt chunk
            raise NgffError(self.key, f"cannot read pixels ({type(exc).__name__}: {exc})") from exc
        kept = [ax for ax in self.axes if ax in SPATIAL or ax == "c"]
        order = [kept.index("y"), kept.index("x")] + ([kept.index("c")] if "c" in kept else [])
        data = np.transpose(data, order)
        if data.ndim == 3 and data.shape[2] == 1:
            data = data[..., 0]
        return np.ascontiguousarray(data)

    def array_dir(self) -> Path:
        """Folder of the level's array on disk."""
        return self.store / self.path / self.array_path


_MICROMETRES = {"micrometer": 1.0, "micron": 1.0, "µm": 1.0, "um": 1.0, "nanometer": 1e-3,
                "millimeter": 1e3, "meter": 1e6, "angstrom": 1e-4}


def join_path(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _image(store: Path, path: str, group, level: int, store_version: str | None,
           **keys: Any) -> NgffImage:
    """Parse one image group's multiscales (and OMERO channel names) into an NgffImage."""
    where = location(store, path)
    ome, version = ome_attrs(group.attrs)
    version = version or store_version
    _check_version(version, where)
    ms = ome.get("multiscales")
    if not ms:
        raise NgffError(where, "not an OME-Zarr image (no multiscales metadata)")
    ms = ms[0]
    axes_meta = ms.get("axes") or []
    axes = "".join((a["name"] if isinstance(a, dict) else str(a)).lower() for a in axes_meta)
    if not axes or "y" not in axes or "x" not in axes:
        raise NgffError(where, f"axes {axes or '(none)'} must include y and x")
    units = {a["name"].lower(): a["unit"] for a in axes_meta
             if isinstance(a, dict) and a.get("unit")}
    datasets = ms.get("datasets") or []
    if not 0 <= level < len(datasets):
        raise NgffError(where, f"level {level} not in the pyramid (levels 0-{len(datasets) - 1})")
    ds = datasets[level]
    scale = [1.0] * len(axes)
    shift = [0.0] * len(axes)
    for source in (ms.get("coordinateTransformations") or [], ds.get("coordinateTransformations")
                   or []):
        for t in source:  # a multiscale-wide scale multiplies the dataset's own
            if t.get("type") == "scale" and len(t.get("scale", [])) == len(axes):
                scale = [a * float(b) for a, b in zip(scale, t["scale"])]
            elif t.get("type") == "translation" and len(t.get("translation", [])) == len(axes):
                shift = [a + float(b) for a, b in zip(shift, t["translation"])]
    try:
        arr = group[ds["path"]]
        shape, dtype = tuple(int(n) for n in arr.shape), str(arr.dtype)
    except KeyError:
        raise NgffError(where, f"array {ds['path']} of level {level} is missing") from None
    except Exception as exc:
        raise NgffError(where, f"array {ds['path']}: unreadable metadata ({exc})") from exc
    if len(shape) != len(axes):
        raise NgffError(where, f"array {ds['path']} has {len(shape)} dimensions, axes {axes}")
    names = tuple(str(c.get("label", "")) for c in (ome.get("omero") or {}).get("channels", []))
    if "c" in axes and len(names) != shape[axes.index("c")]:
        names = ()
    return NgffImage(store=store, path=path, version=str(version), axes=axes, level=level,
                     levels=len(datasets), array_path=str(ds["path"]), shape=shape,
                     dtype=dtype, scale=tuple(scale), translation=tuple(shift), units=units,
                     channel_names=names, **keys)


def plate_name(store: Path) -> str:
    """A plate's name for tables: its folder name without .zarr / .ome.zarr."""
    name = store.name
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def iter_images(store: "str | Path", level: int = 0) -> Iterator["NgffImage | NgffError"]:
    """Every image of a store in plate order (row, column, field); problems are yielded, not raised.

    A plate's missing well or field, or an unreadable one, yields an NgffError naming it and the
    walk goes on; an unreadable store or an unknown NGFF version yields one error for the store.
    """
    store = Path(store)
    try:
        root = _open_group(store)
        ome, version = ome_attrs(root.attrs)
        _check_version(version, str(store))
    except NgffError as exc:
        yield exc
        return
    if "plate" in ome:
        yield from _iter_plate(store, root, ome["plate"], version, level)
    elif "multiscales" in ome:
        try:
            yield _image(store, "", root, level, version)
        except NgffError as exc:
            yield exc
    elif "bioformats2raw.layout" in ome:
        # bioformats2raw: images in groups 0, 1, ... next to an OME group.
        names = sorted((k for k in root.group_keys() if k.isdigit()), key=int)
        for name in names:
            try:
                yield _image(store, name, root[name], level, version, field=name)
            except NgffError as exc:
                yield exc
    else:
        yield NgffError(store, "not an OME-Zarr image or plate (no multiscales or plate "
                               "metadata)")


def _iter_plate(store: Path, root, plate: Mapping[str, Any], version: str | None,
                level: int) -> Iterator["NgffImage | NgffError"]:
    rows = [r["name"] for r in plate.get("rows", [])]
    cols = [c["name"] for c in plate.get("columns", [])]
    pname = plate_name(store)
    for well in plate.get("wells", []):
        wpath = well.get("path", "")
        try:
            row = rows[well["rowIndex"]] if "rowIndex" in well else wpath.split("/")[0]
            col = cols[well["columnIndex"]] if "columnIndex" in well else wpath.split("/")[-1]
        except (IndexError, KeyError, TypeError):
            row, col = (wpath.split("/") + [""])[:2]
        try:
            wgroup = _open_group(store, wpath)
            wmeta, wversion = ome_attrs(wgroup.attrs)
            _check_version(wversion, location(store, wpath))
            images = (wmeta.get("well") or {}).get("images")
            if not images:
                raise NgffError(location(store, wpath), "well has no images (no well metadata)")
        except NgffError as exc:
            yield exc
            continue
        for img in images:
            fpath = join_path(wpath, str(img.get("path", "")))
            try:
                group = _open_group(store, fpath)
                yield _image(store, fpath, group, level, version, plate=pname, row=row,
                             column=col, field=str(img.get("path", "")))
            except NgffError as exc:
                yield exc


def list_store_fields(store: "str | Path") -> list[str]:
    """Group paths of the images a store announces now (for watching a growing plate)."""
    return [im.path for im in iter_images(store) if isinstance(im, NgffImage)]


# -- channels ---------------------------------------------------------------------------------

def parse_channel_spec(text: str) -> tuple["int | str", ...]:
    """--channels "0,1" or "DAPI,CellMask" (nuclear[,whole-cell]): indices or channel names."""
    parts = [p.strip() for p in str(text).split(",")]
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise ValueError("expected NUCLEAR or NUCLEAR,WHOLECELL (indices such as 0,1 or "
                         "channel names such as DAPI,CellMask)")
    out: list[int | str] = []
    for p in parts:
        if p.lstrip("-").isdigit():
            if int(p) < 0:
                raise ValueError(f"channel indices start at 0, got {text!r}")
            out.append(int(p))
        else:
            out.append(p)
    return tuple(out)


def resolve_channels(spec: "Sequence[int | str] | None", names: Sequence[str],
                     where: str) -> tuple[int, ...] | None:
    """Channel names -> indices using the image's OMERO channel names (case-insensitive)."""
    if spec is None:
        return None
    out = []
    lower = [n.lower() for n in names]
    for c in spec:
        if isinstance(c, str):
            if c.lower() not in lower:
                known = ", ".join(names) if names else "none: the image has no OMERO names"
                raise NgffError(where, f"channel {c!r} not found (channels: {known})")
            out.append(lower.index(c.lower()))
        else:
            out.append(int(c))
    return tuple(out)


__all__ = ["NgffError", "NgffImage", "SUPPORTED_VERSIONS", "is_ngff_store", "iter_images",
           "join_path", "list_store_fields", "location", "ome_attrs", "parse_channel_spec",
           "plate_name", "resolve_channels"]
