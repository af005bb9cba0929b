"""Wiring of the stages: `Segmenter` (one image, or its tiles) and the runner that overlaps
reading and preprocessing with inference."""
from cellsam_rt.pipeline.segmenter import (TILE_MODES, PreparedImage, SegmentationResult,
                                           Segmenter)

__all__ = ["Segmenter", "SegmentationResult", "PreparedImage", "TILE_MODES"]
