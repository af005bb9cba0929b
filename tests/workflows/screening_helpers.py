"""Small OME-Zarr plates and images (written with ome-zarr-py's own writer) and blob images for
the screening tests (test_plates, test_resume, test_watch)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

PIXEL_UM = 0.5
CHANNELS = ("DAPI", "CellMask")
REPO = Path(__file__).resolve().parents[2]


def nuclei(size: int = 128, index: int = 0) -> np.ndarray:
    """Two-channel (nuclear, whole-cell) uint16 YXC crop of the DSB 2018 nuclei image img2d.

    Crops step by 64 pixels (49 distinct ones at 128 x 128); the second channel is a blurred copy,
    standing in for a cytoplasm stain.
    """
    import tifffile
    from scipy import ndimage

    img = tifffile.imread(REPO / "tests" / "data" / "stardist" / "img2d.tif")
    steps = (img.shape[0] - size) // 64 + 1
    y, x = (index // steps % steps) * 64, (index % steps) * 64
    nuc = img[y:y + size, x:x + size].astype(np.float32)
    whole = ndimage.gaussian_filter(nuc, 3) * 0.7 + 5
    return np.stack([nuc, whole], -1).astype(np.uint16)


def _omero():
    return {"channels": [{"label": c, "color": "FFFFFF", "active": True,
                          "window": {"start": 0, "end": 1000, "min": 0, "max": 65535}}
                         for c in CHANNELS]}


def _fmt(version: str):
    from ome_zarr.format import FormatV04, FormatV05

    return FormatV05() if version == "0.5" else FormatV04()


def write_ngff_image(group, image_yxc: np.ndarray, version: str, levels: int = 2) -> None:
    """One CYX image with a pyramid, a pixel size in micrometres and OMERO channel names."""
    from ome_zarr.writer import write_image

    write_image(np.moveaxis(image_yxc, -1, 0), group, axes="cyx", fmt=_fmt(version),
                scale_factors=tuple(2 ** i for i in range(1, levels)),
                scale={"c": 1.0, "y": PIXEL_UM, "x": PIXEL_UM},
                axes_units={"y": "micrometer", "x": "micrometer"}, omero=_omero())


def make_image_store(path: Path, version: str = "0.4", size: int = 128, seed: int = 0) -> Path:
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    write_ngff_image(root, nuclei(size, seed), version)
    return path


def make_plate(path: Path, version: str = "0.4", rows=("A", "B"), cols=("1", "2", "3"),
               fields=("0", "1"), size: int = 128, seed: int = 0) -> Path:
    """An HCS plate: rows x cols wells, `fields` per well, each a 2-channel CYX image."""
    import zarr
    from ome_zarr.writer import write_plate_metadata, write_well_metadata

    fmt = _fmt(version)
    root = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    wells = [f"{r}/{c}" for r in rows for c in cols]
    write_plate_metadata(root, list(rows), list(cols), wells, fmt=fmt)
    for i, w in enumerate(wells):
        r, c = w.split("/")
        well = root.require_group(r).require_group(c)
        write_well_metadata(well, list(fields), fmt=fmt)
        for j, f in enumerate(fields):
            write_ngff_image(well.require_group(f), nuclei(size, seed + len(fields) * i + j),
                             version)
    return path


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`python -m cellsam_rt.cli ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "cellsam_rt.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env(), **kw)


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    return e


def temp_files(root: Path) -> list[Path]:
    """Leftover temporary files: atomic_write's .*.part and zarr's *.partial."""
    return [p for p in Path(root).rglob("*") if p.name.endswith((".part", ".partial"))]
