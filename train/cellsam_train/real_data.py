"""Real labelled nuclei images for training: mnfinder's hand-painted nucleus masks.

    python -m cellsam_train --real-data /path/to/mnfinder/training-data ...

Layout (mnfinder 1.2.3, MIT licence): `<split>/<set>/images/<name>.tif` with
`<split>/<set>/nucleus_masks/<name>.png`, an RGBA image with one colour per nucleus
(transparent = background). Any folder holding that layout below it works; train on
`training-data/` only (`validation-data/` is for model selection, `test-data/` for evaluation).

`RealImages.sample(rng, size)` draws one augmented (image, labels) pair: a random crop scaled so
that the image's median nucleus comes out `diameter` model px across once the crop is resized
to `size` (diameter log-uniform in `DIAMETER_RANGE`), a random flip/rotation, and an intensity
change (gamma, gain, offset, extra shot/read noise, occasionally inverted contrast).

Objects the annotators painted in another class (mnfinder's micronuclei, `mn_masks/<name>.png`
beside `nucleus_masks/`) are neither nuclei nor background: their pixels carry the label
`UNLABELLED` (-1), so training can leave them out of the detector's negatives.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["DIAMETER_RANGE", "UNLABELLED", "find_pairs", "read_instance_png", "RealImages"]

DIAMETER_RANGE = (12.0, 64.0)  # median nucleus diameter in model px after the crop's resize
UNLABELLED = -1  # label of an object that is not a nucleus of the set but not background either


def read_instance_png(path: Path) -> np.ndarray:
    """Labels (HxW int32, 0 background) of an RGBA mask with one colour per instance."""
    rgba = np.asarray(Image.open(path).convert("RGBA"))
    code = (rgba[..., 0].astype(np.int64) << 16) | (rgba[..., 1].astype(np.int64) << 8) | rgba[..., 2]
    code = np.where(rgba[..., 3] > 0, code + 1, 0)
    _, inv = np.unique(code, return_inverse=True)
    labels = inv.reshape(code.shape).astype(np.int32)
    if (code == 0).any():
        return labels  # background took index 0
    return labels + 1  # no background pixel at all


def find_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs under `root`: every images/X.tif with a nucleus_masks/X.png."""
    pairs = []
    for img in sorted(Path(root).rglob("images/*.tif")):
        mask = img.parent.parent / "nucleus_masks" / (img.stem + ".png")
        if mask.exists():
            pairs.append((img, mask))
    return pairs


def _median_diameter(labels: np.ndarray) -> float:
    areas = np.bincount(np.maximum(labels, 0).ravel())[1:]
    areas = areas[areas > 0]
    return float(2.0 * np.sqrt(np.median(areas) / np.pi)) if len(areas) else 30.0


class RealImages:
    """Real labelled images held in memory (loaded on first use, so data workers load their own)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pairs = find_pairs(self.root)
        if not self.pairs:
            raise ValueError(f"{self.root}: no images/*.tif with nucleus_masks/*.png below it")
        self._items: Optional[list] = None

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self) -> list:
        import tifffile

        if self._items is None:
            items = []
            for img_path, mask_path in self.pairs:
                image = np.asarray(tifffile.imread(img_path))
                if image.ndim == 3:  # keep the first plane/channel of anything multi-plane
                    image = image[0] if image.shape[0] < image.shape[-1] else image[..., 0]
                labels = read_instance_png(mask_path)
                if labels.shape != image.shape:
                    raise ValueError(f"{mask_path}: mask {labels.shape} does not match image {image.shape}")
                other = mask_path.parent.parent / "mn_masks" / mask_path.name
                if other.exists():
                    unlabelled = read_instance_png(other) > 0
                    if unlabelled.shape != image.shape:
                        raise ValueError(f"{other}: mask {unlabelled.shape} does not match image {image.shape}")
                    labels = np.where((labels == 0) & unlabelled, UNLABELLED, labels).astype(np.int32)
                items.append((image, labels, _median_diameter(labels)))
            self._items = items
        return self._items

    def sample(self, rng: np.random.Generator, size: int,
               diameter_range: tuple[float, float] = DIAMETER_RANGE) -> tuple[np.ndarray, np.ndarray]:
        """One augmented (image, labels) crop; resized to `size` its nuclei are ~diameter px.

        Labels: 1..K nuclei, 0 background, `UNLABELLED` objects of another class."""
        items = self._load()
        image, labels, native_d = items[int(rng.integers(len(items)))]
        h, w = image.shape
        d = float(np.exp(rng.uniform(np.log(diameter_range[0]), np.log(diameter_range[1]))))
        side = int(round(size * native_d / d))
        side = int(np.clip(side, 16, min(h, w)))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        img = image[y0:y0 + side, x0:x0 + side]
        lab = labels[y0:y0 + side, x0:x0 + side]
        other = lab == UNLABELLED
        lab = np.maximum(lab, 0)
        # Drop slivers of nuclei the crop cut off (< 20 % of the nucleus inside it).
        full = np.bincount(np.maximum(labels, 0).ravel(), minlength=int(labels.max()) + 1)
        inside = np.bincount(lab.ravel(), minlength=len(full))
        keep = inside >= 0.2 * np.maximum(full, 1)
        keep[0] = False
        lab = np.where(keep[lab], lab, 0)
        k = int(rng.integers(4))
        img, lab, other = np.rot90(img, k), np.rot90(lab, k), np.rot90(other, k)
        if rng.random() < 0.5:
            img, lab, other = img[:, ::-1], lab[:, ::-1], other[:, ::-1]
        _, inv = np.unique(lab, return_inverse=True)
        lab = inv.reshape(lab.shape).astype(np.int32) + (0 if lab.min() == 0 else 1)  # 1..K
        lab = np.where(other, UNLABELLED, lab).astype(np.int32)
        return _intensity(rng, np.ascontiguousarray(img)), np.ascontiguousarray(lab)


def _intensity(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Gamma, gain, offset, extra noise and (rarely) inversion, back in the image's dtype."""
    dtype = img.dtype
    x = img.astype(np.float32)
    lo = float(np.percentile(x, 1))
    hi = float(np.percentile(x, 99.9)) + 1e-3
    u = np.clip((x - lo) / (hi - lo), 0, None)
    if rng.random() < 0.5:
        u = u ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.3:
        photons = float(np.exp(rng.uniform(np.log(20), np.log(500))))
        u = rng.poisson(u * photons).astype(np.float32) / photons
        u += rng.normal(0, rng.uniform(0, 0.03), u.shape).astype(np.float32)
    if rng.random() < 0.08:
        u = np.clip(1.2 - u, 0, None)
    u = np.clip(u, 0, None)
    top = 255.0 if dtype == np.uint8 else float(rng.choice([4095, 16383, 65535]))
    out_dtype = np.uint8 if dtype == np.uint8 else np.uint16
    scale = top * rng.uniform(0.2, 0.9) / max(float(np.percentile(u, 99.9)), 1e-3)
    offset = rng.uniform(0, 0.1) * top if rng.random() < 0.5 else 0.0
    return np.clip(np.round(u * scale + offset), 0, top).astype(out_dtype)
