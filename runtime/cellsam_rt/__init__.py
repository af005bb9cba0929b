"""Torch-free CellSAM inference: preprocessing, detection, batched mask decoding, tiling."""
__version__ = "0.1.0"
