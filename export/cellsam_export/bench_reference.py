"""The PyTorch reference timed the way `cellsam-rt bench --reference` compares it (torch side).

Lives on the export side so that the runtime package never imports torch; bench.py loads it
lazily when the user asks for the comparison.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import reference
from .checkpoint import load_checkpoint


class ReferenceRunner:
    """One timed repeat of the PyTorch reference (cellsam_export.reference) on the same input."""

    def __init__(self, checkpoint: Path, image: np.ndarray, boxes: Optional[np.ndarray],
                 time_cellfinder: bool, threads: Optional[int], bbox_threshold: float):
        self.torch, self.ref = torch, reference
        if threads:
            torch.set_num_threads(int(threads))
        model, _info = load_checkpoint(checkpoint)
        self.pipeline = reference.ReferencePipeline(model)
        self.image = image
        self.boxes = boxes
        self.time_cellfinder = time_cellfinder and boxes is not None
        self.bbox_threshold = bbox_threshold
        self.last_result = None

    def _cellfinder(self, times: dict) -> None:
        """The reference skips detection for user boxes; time it on the same input."""
        ref, pipe = self.ref, self.pipeline
        resized = ref.resize_to_model(ref.normalize_image(ref.format_image_shape(self.image)),
                                      pipe.size)
        t0 = time.perf_counter()
        finder_in = ref.cellfinder_branch_input(resized, pipe.has_model_cp)
        t1 = time.perf_counter()
        with self.torch.no_grad():
            logits, raw = pipe.model.cellfinder(finder_in)
        t2 = time.perf_counter()
        ref.detect(logits[0], raw[0], pipe.size, self.bbox_threshold)
        t3 = time.perf_counter()
        times["cellfinder_input"] = times.get("cellfinder_input", 0.0) + t1 - t0
        times["cellfinder"] = times.get("cellfinder", 0.0) + t2 - t1
        times["detect"] = times.get("detect", 0.0) + t3 - t2

    def __call__(self) -> dict:
        result = self.pipeline.segment(self.image, bbox_threshold=self.bbox_threshold,
                                       boxes=self.boxes)
        times = dict(result.timings)
        if self.time_cellfinder:
            self._cellfinder(times)
        times["total"] = sum(v for k, v in times.items() if k != "total")
        self.last_result = result
        return times
