"""Access to segment-anything's model modules without importing torchvision.

`import segment_anything` runs the package's __init__, which imports the predictor and through it
torchvision; torchvision does not load beside the CPU torch wheel we pin. The `modeling`
subpackage itself needs only torch, so we import it under a bare package object.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _import_sam_modeling() -> types.ModuleType:
    """Import `segment_anything.modeling` without executing `segment_anything/__init__.py`."""
    if "segment_anything.modeling" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "segment-anything is not installed: pip install 'cellsam-rt[export]'"
        )
    if "segment_anything" not in sys.modules:
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["segment_anything"] = pkg
    return importlib.import_module("segment_anything.modeling")


_modeling = _import_sam_modeling()
Sam = _modeling.Sam
ImageEncoderViT = _modeling.ImageEncoderViT
PromptEncoder = _modeling.PromptEncoder
MaskDecoder = _modeling.MaskDecoder
TwoWayTransformer = _modeling.TwoWayTransformer

__all__ = ["Sam", "ImageEncoderViT", "PromptEncoder", "MaskDecoder", "TwoWayTransformer"]
