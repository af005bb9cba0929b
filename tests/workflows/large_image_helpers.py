"""Synthetic images for the blockwise tests: bright filled discs (nuclei, 32 px across) on a dark
noisy background, planted across block borders and on block corners."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 760            # 2 x 2 blocks of BLOCK pixels
BLOCK = 384
OVERLAP = 64          # block + 2 x overlap = 512, one model pass per block
RADIUS = 16
BLOCK_ARGS = ["--blockwise", "--block", str(BLOCK), "--block-overlap", str(OVERLAP),
              "--threads", "1"]


def centres(size: int = SIZE) -> list[tuple[int, int]]:
    """A grid through the block borders (384) and the shared corner, plus cells straddling a
    border off-centre; no two discs touch."""
    grid = [(y, x) for y in (60, 200, 384, 520, 700) for x in (60, 200, 384, 520, 700)
            if y < size - RADIUS and x < size - RADIUS]
    return grid + [(374, 290), (290, 393), (394, 450), (450, 377)]


def discs(size: int = SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 image, int32 truth labels 1..n)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, (size, size))
    truth = np.zeros((size, size), np.int32)
    yy, xx = np.ogrid[:size, :size]
    for k, (cy, cx) in enumerate(centres(size), 1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS ** 2
        image[disc] += 900
        truth[disc] = k
    return np.clip(image, 0, 65535).astype(np.uint16), truth


def write_ome_zarr(path: Path, image: np.ndarray, version: str = "0.4") -> Path:
    """A YX OME-Zarr image with two pyramid levels, written by ome-zarr-py."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    write_image(image, root, axes="yx", scale_factors=(2,),
                fmt=FormatV05() if version == "0.5" else FormatV04(),
                storage_options={"chunks": (256, 256)})
    return path


def read_labels(label_group: Path) -> np.ndarray:
    """Level 0 of an OME-Zarr label image, checked to be one through ome-zarr-py's reader."""
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(label_group)))())
    assert any(isinstance(spec, Label) for n in nodes for spec in n.specs), label_group
    return np.asarray(zarr.open_array(str(label_group / "0"), mode="r"))


def check_cells(labels: np.ndarray, truth: np.ndarray, min_iou: float = 0.9) -> None:
    """Every planted disc is exactly one label (IoU >= min_iou with it), no label spans two
    discs, labels are 1..K. A disc cut at a block border would score 0.5 or less."""
    n = int(truth.max())
    ids = np.unique(labels[labels > 0])
    assert ids.tolist() == list(range(1, len(ids) + 1)), "labels are not 1..K"
    assert len(ids) == n, f"{len(ids)} labels for {n} discs"
    seen = set()
    for k in range(1, n + 1):
        disc = truth == k
        values, counts = np.unique(labels[disc], return_counts=True)
        best = int(values[np.argmax(counts)])
        assert best > 0, f"disc {k} not found"
        mask = labels == best
        iou = (disc & mask).sum() / (disc | mask).sum()
        assert iou >= min_iou, f"disc {k}: IoU {iou:.3f}"
        assert best not in seen, f"label {best} covers two discs"
        seen.add(best)
