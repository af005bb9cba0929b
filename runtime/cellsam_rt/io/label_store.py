"""OME-Zarr label images written block by block (for images larger than memory).

The label image is built in a staging store (`<stage>/labels/<name>`): its arrays are created
empty, filled region by region (by any process that sees the folder), its lower pyramid levels
are computed chunk by chunk from the level above, and its NGFF metadata (multiscales and
image-label, through ome-zarr-py's metadata writers) is written last. `commit_labels` then moves
the finished group into place with one rename and lists it in the image's `labels` group, so a
killed run never leaves a label image that claims to be complete.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellsam_rt.io.ngff import SPATIAL, NgffImage, join_path, ome_attrs

MAX_CHUNK = 1024


@dataclass
class LabelLayout:
    """Shape, axes and scales of a label image (and of each pyramid level)."""

    axes: str                       # lower-case, e.g. "yx", "cyx" (non-spatial axes of length 1)
    height: int
    width: int
    levels: int
    version: str = "0.4"            # NGFF version: "0.4" (zarr v2) or "0.5" (zarr v3)
    scale: tuple = ()               # level 0's scale per axis (default 1)
    translation: tuple = ()
    units: dict = field(default_factory=dict)

    @classmethod
    def like(cls, image: NgffImage) -> "LabelLayout":
        """The layout of labels for an OME-Zarr image's segmented level (same axes and scale)."""
        h, w = image.shape[image.axes.index("y")], image.shape[image.axes.index("x")]
        return cls(axes=image.axes, height=h, width=w, levels=image.levels - image.level,
                   version=image.version, scale=image.scale, translation=image.translation,
                   units={k: v for k, v in image.units.items() if k in image.axes})

    def shape(self, level: int) -> tuple[int, ...]:
        h, w = -(-self.height // 2 ** level), -(-self.width // 2 ** level)
        return tuple({"y": h, "x": w}.get(ax, 1) for ax in self.axes)

    def n_levels(self) -> int:
        n = 1
        while n < self.levels and min(self.height, self.width) // 2 ** n >= 1:
            n += 1
        return n

    def fmt(self):
        from ome_zarr.format import FormatV04, FormatV05

        return FormatV05() if self.version == "0.5" else FormatV04()


def chunk_for(block: int) -> int:
    """Chunk side of level 0: a divisor of the block size, so no two blocks share a chunk."""
    for c in (MAX_CHUNK, MAX_CHUNK // 2):
        if block > MAX_CHUNK and block % c == 0:
            return c
    return block


def create_labels(stage: Path, name: str, layout: LabelLayout, dtype, chunk: int) -> None:
    """Empty label arrays of every level in a new staging store (replaces an older one)."""
    import zarr

    if stage.exists():
        shutil.rmtree(stage)
    v3 = layout.version == "0.5"
    root = zarr.open_group(str(stage), mode="w", zarr_format=3 if v3 else 2)
    group = root.require_group("labels").require_group(name)
    for level in range(layout.n_levels()):
        shape = layout.shape(level)
        chunks = tuple(1 if ax not in SPATIAL else min(n, chunk if level == 0 else MAX_CHUNK)
                       for ax, n in zip(layout.axes, shape))
        extra = {"dimension_names": list(layout.axes)} if v3 else {}
        group.create_array(str(level), shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                           **extra)


def level_array(stage: Path, name: str, level: int = 0, mode: str = "r+"):
    import zarr

    return zarr.open_array(str(stage), path=f"labels/{name}/{level}", mode=mode)


def write_region(stage: Path, name: str, layout: LabelLayout, y0: int, x0: int,
                 labels: np.ndarray) -> None:
    """Write a 2-D block of labels at (y0, x0) of level 0."""
    arr = level_array(stage, name)
    h, w = labels.shape
    index = tuple(slice(y0, y0 + h) if ax == "y" else slice(x0, x0 + w) if ax == "x" else 0
                  for ax in layout.axes)
    arr[index] = labels.astype(arr.dtype, copy=False)


def build_pyramid(stage: Path, name: str, layout: LabelLayout) -> None:
    """Levels 1.. from the level above (nearest neighbour), chunk by chunk with Dask."""
    import dask
    import dask.array as da

    spatial = tuple(slice(None, None, 2) if ax in SPATIAL else slice(None) for ax in layout.axes)
    for level in range(1, layout.n_levels()):
        src = da.from_zarr(level_array(stage, name, level - 1, mode="r"))
        dst = level_array(stage, name, level)
        with dask.config.set(scheduler="threads", num_workers=2):
            da.to_zarr(src[spatial].rechunk(dst.chunks), dst)


def finish_labels(stage: Path, name: str, layout: LabelLayout) -> None:
    """The multiscales and image-label metadata (ome-zarr-py's writers), written last."""
    import zarr
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    fmt = layout.fmt()
    root = zarr.open_group(str(stage), mode="r+")
    scale = list(layout.scale) or [1.0] * len(layout.axes)
    datasets = []
    for level in range(layout.n_levels()):
        s = [v * 2 ** level if ax in SPATIAL else v for ax, v in zip(layout.axes, scale)]
        transforms = [{"type": "scale", "scale": s}]
        if any(layout.translation):
            transforms.append({"type": "translation", "translation": list(layout.translation)})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    write_multiscales_metadata(root["labels"][name], datasets, fmt=fmt, axes=list(layout.axes),
                               axes_units=layout.units or None, name=name)
    write_label_metadata(root["labels"], name, fmt=fmt, source={"image": "../../"})


def commit_labels(stage: Path, name: str, store: Path, path: str, layout: LabelLayout) -> Path:
    """Move the finished label image to `<store>/<path>/labels/<name>` (replacing one there) and
    list it in the labels group's metadata. The move is one rename (same file system)."""
    import zarr

    v3 = layout.version == "0.5"
    root = zarr.open_group(str(store), mode="a", zarr_format=3 if v3 else 2)
    group = root.require_group(path) if path else root
    labels = group.require_group("labels")
    dest = store / join_path(path, "labels", name)
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(stage / "labels" / name, dest)
    meta, _ = ome_attrs(labels.attrs)
    listed = list(dict.fromkeys(list(meta.get("labels", [])) + [name]))
    if v3:
        ome = dict(labels.attrs.get("ome", {}))
        ome.update(labels=listed, version=layout.version)
        labels.attrs["ome"] = ome
    else:
        labels.attrs["labels"] = listed
    shutil.rmtree(stage, ignore_errors=True)
    return dest


__all__ = ["LabelLayout", "build_pyramid", "chunk_for", "commit_labels", "create_labels",
           "finish_labels", "level_array", "write_region"]
