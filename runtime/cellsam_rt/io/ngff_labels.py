"""OME-Zarr label images: `labels/<name>` of an image (in its store, or in a mirrored store),
written with ome-zarr-py's own writer (`ome_zarr.writer.write_labels`), idempotently."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np

from cellsam_rt.io.ngff import SPATIAL, NgffError, NgffImage, join_path, location, ome_attrs

DEFAULT_LABEL_NAME = "cells"
# zarr's LocalStore writes <name>.<32 hex>.partial and renames it; a kill leaves them behind.
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


class LabelExistsError(NgffError):
    """The label image to be written exists already (and --overwrite was not given)."""


def label_target(image: NgffImage, out_root: "str | Path | None") -> tuple[Path, str]:
    """(store, image group path) that receives this image's labels: the input or its mirror."""
    if out_root is None:
        return image.store, image.path
    return Path(out_root) / image.store.name, image.path


def label_exists(image: NgffImage, name: str, out_root: "str | Path | None" = None) -> bool:
    store, path = label_target(image, out_root)
    base = store / path / "labels" / name
    return (base / "zarr.json").is_file() or (base / ".zattrs").is_file() \
        or (base / ".zgroup").is_file()


def remove_partial_files(folder: Path) -> int:
    """Delete zarr's leftover temporary files (from a killed write) under `folder`."""
    n = 0
    if not folder.is_dir():
        return 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if _ZARR_PARTIAL.search(f):
                os.unlink(os.path.join(dirpath, f))
                n += 1
    return n


def _mirror_groups(image: NgffImage, store: Path) -> None:
    """Create the mirror store's groups down to the image, with the plate's and wells' metadata."""
    import zarr

    fmt_v = 3 if image.version == "0.5" else 2
    src_root = zarr.open_group(str(image.store), mode="r")
    root = zarr.open_group(str(store), mode="a", zarr_format=fmt_v)
    if not dict(root.attrs) and "plate" in ome_attrs(src_root.attrs)[0]:
        root.attrs.update(dict(src_root.attrs))
    parts = image.path.split("/") if image.path else []
    group, src = root, src_root
    for i, part in enumerate(parts):
        src = src[part]
        group = group.require_group(part)
        if i < len(parts) - 1 and not dict(group.attrs):
            group.attrs.update(dict(src.attrs))  # row group / well metadata


def write_label_image(image: NgffImage, labels: np.ndarray, name: str = DEFAULT_LABEL_NAME,
                      out_root: "str | Path | None" = None, overwrite: bool = False) -> Path:
    """Write a 2-D label image as `labels/<name>` of the image (or of its mirror under out_root).

    Same axes (non-spatial ones of length 1) and scale as the image level that was segmented, a
    nearest-neighbour pyramid with as many levels as the image has from that level on, and
    image-label metadata. Re-writing the same labels gives the same bytes (idempotent).
    """
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_labels

    labels = np.asarray(labels)
    h, w = image.shape[image.axes.index("y")], image.shape[image.axes.index("x")]
    if labels.shape != (h, w):
        raise ValueError(f"{image.key}: labels {labels.shape} do not match the image ({h}, {w})")
    store, path = label_target(image, out_root)
    where = location(store, join_path(path, "labels", name))
    if label_exists(image, name, out_root):
        if not overwrite:
            raise LabelExistsError(where, "exists already; pass --overwrite to replace it")
        shutil.rmtree(store / path / "labels" / name)
    if out_root is not None:
        _mirror_groups(image, store)
    remove_partial_files(store / path / "labels")
    fmt = FormatV05() if image.version == "0.5" else FormatV04()
    nd = labels.reshape(tuple(1 if ax not in SPATIAL else n
                              for ax, n in zip(image.axes, image.shape)))
    factors = []
    for i in range(1, image.levels - image.level):
        if min(h, w) // 2 ** i < 1:
            break
        factors.append({ax: (2 ** i if ax in SPATIAL else 1) for ax in image.axes})
    group = zarr.open_group(str(store), mode="a")
    group = group.require_group(path) if path else group
    chunks = tuple(1 if ax not in SPATIAL else min(n, 1024)
                   for ax, n in zip(image.axes, nd.shape))
    import dask

    with dask.config.set(scheduler="synchronous"):  # already on a writer thread
        write_labels(nd, group, name=name, scaler=None, scale_factors=factors, fmt=fmt,
                     axes=list(image.axes), scale=dict(zip(image.axes, image.scale)),
                     axes_units={k: v for k, v in image.units.items() if k in image.axes} or None,
                     storage_options={"chunks": chunks},
                     label_metadata={"source": {"image": "../../"}})
    if any(image.translation):
        _shift_label(group["labels"][name], image.translation)
    # write_labels appends the name to labels/.attrs["labels"] even when listed: keep it once.
    lgroup = group["labels"]
    meta, _ = ome_attrs(lgroup.attrs)
    listed = list(dict.fromkeys(meta.get("labels", [])))
    if listed != meta.get("labels", []):
        if "ome" in lgroup.attrs:
            ome = dict(lgroup.attrs["ome"])
            ome["labels"] = listed
            lgroup.attrs["ome"] = ome
        else:
            lgroup.attrs["labels"] = listed
    return store / path / "labels" / name


def _shift_label(label_group, shift) -> None:
    """Add the segmented level's translation to the label's (a level > 0 is offset by half a
    pixel or more), so labels and image overlay in physical space."""
    meta, _ = ome_attrs(label_group.attrs)
    ms = [dict(m) for m in meta["multiscales"]]
    for ds in ms[0]["datasets"]:
        ts = [dict(t) for t in ds["coordinateTransformations"]]
        moved = False
        for t in ts:
            if t["type"] == "translation":
                t["translation"] = [a + b for a, b in zip(t["translation"], shift)]
                moved = True
        if not moved:
            ts.append({"type": "translation", "translation": list(shift)})
        ds["coordinateTransformations"] = ts
    if "ome" in label_group.attrs:
        ome = dict(label_group.attrs["ome"])
        ome["multiscales"] = ms
        label_group.attrs["ome"] = ome
    else:
        label_group.attrs["multiscales"] = ms


__all__ = ["DEFAULT_LABEL_NAME", "LabelExistsError", "label_exists", "label_target",
           "remove_partial_files", "write_label_image"]
