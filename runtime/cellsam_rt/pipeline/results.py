"""What the pipeline hands back (`SegmentationResult`) and between its steps (a prepared image,
one image's labels before the table)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

__all__ = ["SegmentationResult", "PreparedImage"]


@dataclass
class SegmentationResult:
    """Labels and per-cell data of one segmented image."""

    labels: np.ndarray          # HxW uint16 (uint32 past 65535 labels), 0 = background
    label_ids: np.ndarray       # [n] label values present, ascending
    boxes: np.ndarray           # [n, 4] float32 xyxy image pixels: the prompt of each label
    scores: np.ndarray          # [n] float32 detection score of each label (NaN for user boxes)
    table: np.ndarray           # cell_table rows (structured array), one per label
    timings: dict = field(default_factory=dict)  # seconds per stage, plus "total"
    tiled: bool = False
    #: image-to-model scale of the native-scale path (tile="auto" with a model that states its
    #: object diameter): the model saw the image resized by this factor; None on other paths
    scale: Optional[float] = None

    @property
    def n_cells(self) -> int:
        """Number of labelled cells."""
        return int(len(self.label_ids))

    @property
    def scores_by_label(self) -> dict:
        """Detection score keyed by label value."""
        return {int(k): float(s) for k, s in zip(self.label_ids, self.scores)}


@dataclass
class PreparedImage:
    """An image after the CPU-heavy preprocessing, ready for `Segmenter.segment(prepared=...)`."""

    img3: np.ndarray                       # HxWx3 float64, channels in the reference's slots
    encoder_in: Optional[np.ndarray]       # [3,S,S] (None when the image will be tiled)
    cellfinder_in: Optional[np.ndarray]    # [3,S,S]
    seconds: float = 0.0                   # time prepare() took
    #: what the model sees in place of the image (smoothed, `stages.denoise`, and/or inverted,
    #: `polarity.orient`); None: the image itself
    view: Optional[np.ndarray] = None


@dataclass
class _ImageSeg:
    """One image's (or tile's) labels after hole filling, with each label's prompt."""

    labels: np.ndarray      # int32 HxW, the reference's numbering (need not be contiguous)
    label_ids: np.ndarray   # [n] labels present
    boxes_s: np.ndarray     # [n, 4] prompt of each label in S-space
    scores: np.ndarray      # [n]
