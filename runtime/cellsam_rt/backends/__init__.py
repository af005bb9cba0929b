"""Inference backends behind one interface: `Backend.run(graph, inputs) -> outputs`."""
from __future__ import annotations

import importlib
from pathlib import Path

from ..model_dir import ModelDir, resolve_model
from .base import Backend, BackendError

#: names accepted by `create_backend` and the CLI's --backend
BACKENDS = ("cpu", "cuda", "tensorrt-ep", "tensorrt")
PRECISIONS = ("fp32", "fp16")
_ORT_DEVICE = {"cpu": "cpu", "cuda": "cuda", "tensorrt-ep": "tensorrt"}

__all__ = ["BACKENDS", "Backend", "BackendError", "create_backend"]


def create_backend(model_dir: "ModelDir | str | Path | None", backend: str = "cpu",
                   precision: str = "fp32", threads: int | None = None, **kw) -> Backend:
    """Make the backend named `backend` for a model directory; extra options go to its class."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r} (expected {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r} (expected {', '.join(PRECISIONS)})")
    model = resolve_model(model_dir)
    if backend in _ORT_DEVICE:
        # Imported here so that merely listing backends does not load onnxruntime.
        from .onnxruntime import OrtBackend
        return OrtBackend(model, device=_ORT_DEVICE[backend], precision=precision,
                          threads=threads, **kw)
    # threads only sizes onnxruntime's pools; TensorRT runs on the GPU.
    return _native_tensorrt(model, precision=precision, **kw)


def _native_tensorrt(model: ModelDir, **kw) -> Backend:
    """The native TensorRT backend: `backends/tensorrt.py` must define `TensorRTBackend`."""
    try:
        import tensorrt  # noqa: F401  (only probing that the package is there)
    except ImportError as exc:
        raise BackendError("native TensorRT backend needs the tensorrt package (pip install "
                           "tensorrt, on a machine with an NVIDIA GPU); or use --backend "
                           f"tensorrt-ep or cuda ({exc})") from exc
    try:
        module = importlib.import_module(".tensorrt", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.tensorrt":
            raise
        raise BackendError("the native TensorRT backend is not part of this cellsam-rt build; "
                           "use --backend tensorrt-ep") from exc
    return module.TensorRTBackend(model, **kw)
