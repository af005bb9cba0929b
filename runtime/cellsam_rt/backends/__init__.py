"""Inference backends behind one interface: `Backend.run(graph, inputs) -> outputs`."""
from __future__ import annotations

import importlib
from pathlib import Path

from cellsam_rt.model_dir import ModelDir, resolve_model
from cellsam_rt.backends.base import Backend, BackendError

#: names accepted by `create_backend` and the CLI's --backend
from cellsam_rt.config import BACKENDS, PRECISIONS
_ORT_DEVICE = {"cpu": "cpu", "cuda": "cuda", "tensorrt-ep": "tensorrt"}

__all__ = ["BACKENDS", "Backend", "BackendError", "create_backend"]


def create_backend(model_dir: "ModelDir | str | Path | None", backend: str = "cpu",
                   precision: str = "fp32", threads: int | None = None, **kw) -> Backend:
    """Make the backend named `backend` for a model directory; extra options go to its class."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r} (expected {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r} (expected {', '.join(PRECISIONS)})")
    if precision == "int8" and backend != "cpu":
        # Dynamic INT8 quantisation targets CPU integer units; GPU EPs would fall back node by node.
        raise BackendError(f"int8 graphs run on the cpu backend only, not {backend}")
    model = resolve_model(model_dir)
    if backend in _ORT_DEVICE:
        # Imported here so that merely listing backends does not load onnxruntime.
        from cellsam_rt.backends.onnxruntime import OrtBackend
        return OrtBackend(model, device=_ORT_DEVICE[backend], precision=precision,
                          threads=threads, **kw)
    # threads only sizes onnxruntime's pools; TensorRT runs on the GPU.
    return _native_tensorrt(model, precision=precision, **kw)


def _native_tensorrt(model: ModelDir, **kw) -> Backend:
    """The native TensorRT backend of `backends/tensorrt/backend.py` (engines from `build-engines`)."""
    try:
        import tensorrt  # noqa: F401  (only probing that the package is there)
    except ImportError as exc:
        raise BackendError("native TensorRT backend needs the tensorrt package (pip install "
                           "tensorrt-cu13 cuda-python on a machine with an NVIDIA GPU; CUDA 12 "
                           "drivers: tensorrt-cu12), or use --backend tensorrt-ep or cuda "
                           f"({exc})") from exc
    module = importlib.import_module(".tensorrt.backend", __name__)
    return module.create(model, **kw)
