"""napari sample data: a 256x256 crop of nuclei that the shipped default model segments offline.

The crop is rows 256-511, columns 0-255 of `img2d.tif` from the Data Science Bowl 2018
(BBBC038, CC0) as shipped with StarDist 0.9.2.
"""
from __future__ import annotations

from pathlib import Path

import tifffile

__all__ = ["SAMPLE_PATH", "nuclei_sample"]

SAMPLE_PATH = Path(__file__).with_name("sample.tif")


def nuclei_sample() -> list[tuple]:
    """npe2 sample-data hook: the nuclei crop as an image layer."""
    return [(tifffile.imread(SAMPLE_PATH), {"name": "nuclei"}, "image")]
