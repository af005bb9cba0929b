"""TensorRT engines for a model directory: naming, finding, and refusing stale ones (`build.py`
builds them).

An engine is only valid for the TensorRT version and the GPU it was built with, so engines are
built on the machine that runs them (`cellsam-rt build-engines MODEL`) and written beside the
manifest under names that carry both, e.g. `encoder.trt10.8.0.43.sm90-NVIDIA_H100_80GB_HBM3.fp16.engine`,
each with a JSON sidecar recording what was built. The runtime looks up the engine for the
current TensorRT and GPU and, when only engines for another TensorRT/GPU (or from a re-exported
graph) exist, refuses them with the command that rebuilds them instead of crashing inside
TensorRT.

FP16 engines keep LayerNorm, Softmax and the normalisation reduce chains in FP32 (docs/design.md
§4: all-FP16 SAM overflows in LayerNorm):
- TensorRT 10 ("weak" typing): the FP32 ONNX graphs are built with the FP16 builder flag and
  per-layer FP32 precision constraints (OBEY_PRECISION_CONSTRAINTS) on those layers;
- TensorRT 11+ removed weak typing, so the exporter's mixed-precision `*.fp16.onnx` graphs
  (which already keep those nodes in FP32) are built as strongly typed networks.

Everything here except the `current_*` probes is pure Python and GPU-free.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cellsam_rt.backends.base import BackendError
from cellsam_rt.io.outputs import atomic_write
from cellsam_rt.model_dir import GRAPH_NAMES, ModelDir, resolve_model

SIDECAR_FORMAT = 1
ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".json"
from cellsam_rt.config import ENGINE_PRECISIONS as PRECISIONS
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_BOXES = 256
# Kernels are tuned for the opt shape: tiles arrive in batches, but at 1024x1024 a ViT-B
# saturates the GPU by batch 4, so a larger opt buys nothing; most images yield tens of boxes.
DEFAULT_OPT_BATCH = 4
DEFAULT_OPT_BOXES = 64
DEFAULT_WORKSPACE_GB = 8.0
TYPINGS = ("auto", "weak", "strong")


class EngineError(BackendError):
    """An engine that cannot be built, found or used; the message says what to do."""


class EngineMismatchError(EngineError):
    """An engine built for another TensorRT version, another GPU, or another graph file."""


class EngineNotFoundError(EngineError):
    """No engine has been built for this model, graph and precision."""


@dataclass(frozen=True)
class GpuIdentity:
    """What an engine is tied to on the hardware side: the GPU's name and compute capability."""

    name: str
    compute_capability: str  # "9.0"

    @property
    def sm(self) -> str:
        """Compute capability as TensorRT/nvcc spell it ("sm90")."""
        return "sm" + self.compute_capability.replace(".", "")

    def __str__(self) -> str:
        return f"{self.name} ({self.sm})"


# ---------------------------------------------------------------- names and profiles (pure)

def _sanitize(text: str) -> str:
    """Letters, digits, '_' and '-' only: GPU names carry spaces, slashes and dots."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text).strip()).strip("_") or "unknown"


def _version_token(version: str) -> str:
    """A TensorRT version for a file name: digits and dots only ("10.8.0.43")."""
    token = re.sub(r"[^0-9.]+", "", str(version)).strip(".")
    if not token:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return token


def normalize_compute_capability(cc: Any) -> str:
    """Compute capability as "major.minor" from (9, 0), "9.0", "90", "sm90" or "sm_90"."""
    if isinstance(cc, (tuple, list)) and len(cc) == 2:
        return f"{int(cc[0])}.{int(cc[1])}"
    text = str(cc).strip().lower().removeprefix("sm").lstrip("_")
    if re.fullmatch(r"\d+\.\d+", text):
        major, minor = text.split(".")
        return f"{int(major)}.{int(minor)}"
    if re.fullmatch(r"\d{2,3}", text):  # "90", "100", "120": the last digit is the minor
        return f"{int(text[:-1])}.{int(text[-1])}"
    raise ValueError(f"not a compute capability: {cc!r}")


def engine_name(graph: str, trt_version: str, gpu_name: str, compute_capability: Any,
                precision: str) -> str:
    """File name of the engine for one graph, TensorRT version, GPU and precision."""
    if graph not in GRAPH_NAMES:
        raise ValueError(f"unknown graph {graph!r} (graphs are {', '.join(GRAPH_NAMES)})")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (expected fp16 or fp32)")
    sm = "sm" + normalize_compute_capability(compute_capability).replace(".", "")
    return (f"{graph}.trt{_version_token(trt_version)}.{sm}-{_sanitize(gpu_name)}"
            f".{precision}{ENGINE_SUFFIX}")


def sidecar_path(engine_path: str | Path) -> Path:
    """The JSON sidecar that records how an engine was built."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name[: -len(ENGINE_SUFFIX)] + SIDECAR_SUFFIX)


def timing_cache_name(trt_version: str, gpu_name: str, compute_capability: Any) -> str:
    """File name of the persistent timing cache (tied to TensorRT version and GPU, like engines)."""
    sm = "sm" + normalize_compute_capability(compute_capability).replace(".", "")
    return f"timing.trt{_version_token(trt_version)}.{sm}-{_sanitize(gpu_name)}.cache"


def _geometry(model: Any) -> tuple[int, tuple[int, int, int]]:
    """(image_size, embedding_shape) from a ModelDir, a manifest dict, or a model-dir path."""
    if isinstance(model, Mapping):
        c, h, w = model["embedding_shape"]
        return int(model["image_size"]), (int(c), int(h), int(w))
    if not isinstance(model, ModelDir):
        model = ModelDir.load(model)
    return model.image_size, model.embedding_shape


Shape = tuple[int, ...]


def profile_shapes(model: Any, graph: str, max_batch: int = DEFAULT_MAX_BATCH,
                   max_boxes: int = DEFAULT_MAX_BOXES, opt_batch: int | None = None,
                   opt_boxes: int | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The optimisation profile (min, opt, max) of every input of `graph`."""
    if max_batch < 1 or max_boxes < 1:
        raise ValueError(f"max_batch and max_boxes must be >= 1 (got {max_batch}, {max_boxes})")
    size, (c, h, w) = _geometry(model)
    ob = min(max_batch, opt_batch or DEFAULT_OPT_BATCH)
    on = min(max_boxes, opt_boxes or DEFAULT_OPT_BOXES)
    if ob < 1 or on < 1:
        raise ValueError("opt_batch and opt_boxes must be >= 1")
    if graph in ("encoder", "cellfinder"):
        return {"image": ((1, 3, size, size), (ob, 3, size, size), (max_batch, 3, size, size))}
    if graph == "decoder":
        # T (embeddings) is the tile batch; N (boxes) is per call, across all T images.
        return {
            "embeddings": ((1, c, h, w), (ob, c, h, w), (max_batch, c, h, w)),
            "boxes": ((1, 4), (on, 4), (max_boxes, 4)),
            "box_image": ((1,), (on,), (max_boxes,)),
        }
    raise ValueError(f"unknown graph {graph!r} (graphs are {', '.join(GRAPH_NAMES)})")


# ---------------------------------------------------------------- sidecars and staleness (pure)

def _read_sidecar(sidecar: Any) -> tuple[dict, Path | None]:
    """A sidecar as a dict plus its path when it came from a file."""
    if isinstance(sidecar, Mapping):
        return dict(sidecar), None
    path = Path(sidecar)
    if path.name.endswith(ENGINE_SUFFIX):
        path = sidecar_path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except FileNotFoundError as exc:
        raise EngineMismatchError(
            f"{path}: missing; the engine beside it cannot be checked, so it is not used; "
            f"rebuild with: cellsam-rt build-engines {path.parent}") from exc
    except (OSError, ValueError) as exc:
        raise EngineMismatchError(
            f"{path}: unreadable engine record ({exc}); rebuild with: "
            f"cellsam-rt build-engines {path.parent}") from exc


def _as_gpu(gpu: Any) -> GpuIdentity:
    """GpuIdentity from a GpuIdentity, a (name, cc) pair, or a sidecar's {"name", "compute_capability"}."""
    if isinstance(gpu, GpuIdentity):
        return gpu
    if isinstance(gpu, Mapping):
        return GpuIdentity(str(gpu["name"]), normalize_compute_capability(gpu["compute_capability"]))
    name, cc = gpu
    return GpuIdentity(str(name), normalize_compute_capability(cc))


def rebuild_command(model_dir: Any, precision: str | None = None) -> str:
    """The command line that rebuilds a model's engines."""
    cmd = f"cellsam-rt build-engines {model_dir}"
    return cmd + (f" --precision {precision}" if precision else "")


def check_engine_fresh(sidecar: Any, current_trt_version: str, current_gpu: Any,
                       model_dir: Any = None) -> dict:
    """Return the sidecar if its engine fits this TensorRT and GPU, else raise EngineMismatchError."""
    record, path = _read_sidecar(sidecar)
    model = model_dir or record.get("model_dir") or (path.parent if path else "MODEL")
    precision = record.get("precision")
    fix = f"rebuild with: {rebuild_command(model, precision)}"
    what = f"engine {record.get('engine', path or '?')}"
    try:
        built_trt = str(record["tensorrt"])
        built_gpu = _as_gpu(record["gpu"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineMismatchError(f"{what}: its record lacks the TensorRT version or GPU ({exc}); "
                                  f"{fix}") from exc
    gpu = _as_gpu(current_gpu)
    # Engines are not portable across TensorRT builds (even patch releases) nor across GPU models.
    if built_trt != str(current_trt_version) or built_gpu != gpu:
        raise EngineMismatchError(
            f"{what} was built for TensorRT {built_trt} on GPU {built_gpu}; this machine has "
            f"TensorRT {current_trt_version} on GPU {gpu}; {fix}")
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_engine_source(record: Mapping, model: ModelDir) -> None:
    """Raise EngineMismatchError if the graph an engine was built from has changed since."""
    source = record.get("source") or {}
    graph, typed = record.get("graph"), record.get("source_precision", record.get("precision"))
    fix = f"rebuild with: {rebuild_command(model.path, record.get('precision'))}"
    try:
        current = model.graph_path(graph, typed)
    except Exception as exc:  # noqa: BLE001 - any manifest problem makes the engine unverifiable
        raise EngineMismatchError(f"engine {record.get('engine')}: its source graph is gone "
                                  f"({exc}); {fix}") from exc
    if source.get("file") != current.name or source.get("size") != current.stat().st_size \
            or source.get("sha256") != _sha256(current):
        raise EngineMismatchError(
            f"engine {record.get('engine')} was built from a different {graph} graph than "
            f"{current} (the model was re-exported); {fix}")


def engine_record(model: ModelDir, graph: str, precision: str, trt_version: str, gpu: Any,
                  shapes: Mapping[str, tuple[Shape, Shape, Shape]], *, typing: str,
                  source_precision: str, **extra: Any) -> dict:
    """The sidecar contents for an engine: versions, GPU, profile, precision and source graph."""
    gpu = _as_gpu(gpu)
    onnx_path = model.graph_path(graph, source_precision)
    return {
        "format": SIDECAR_FORMAT,
        "engine": engine_name(graph, trt_version, gpu.name, gpu.compute_capability, precision),
        "graph": graph,
        "precision": precision,
        "typing": typing,
        "source_precision": source_precision,
        "tensorrt": str(trt_version),
        "gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability},
        "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                    for k, v in shapes.items()},
        "source": {"file": onnx_path.name, "size": onnx_path.stat().st_size,
                   "sha256": _sha256(onnx_path)},
        "model": {"name": model.name, "dir": str(model.path)},
        "model_dir": str(model.path),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in extra.items()},
    }


def write_bytes(path: Path, data: Any) -> None:
    """Write bytes (or any buffer, e.g. TensorRT's IHostMemory) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(data))


def write_sidecar(engine_path: Path, record: Mapping) -> Path:
    """Atomically write an engine's sidecar JSON beside it; return the sidecar path."""
    path = sidecar_path(engine_path)
    write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
    return path


ENGINE_DIR_ENV = "CELLSAM_RT_ENGINE_DIR"


def _engine_dir(model: ModelDir, engine_dir: Any) -> Path:
    """Where engines live: the argument, else $CELLSAM_RT_ENGINE_DIR, else beside the manifest."""
    if engine_dir is None:
        engine_dir = os.environ.get(ENGINE_DIR_ENV) or None
    return Path(engine_dir).expanduser() if engine_dir is not None else model.path


def find_engine(model_dir: Any, graph: str, precision: str, trt_version: str, gpu: Any,
                engine_dir: Any = None, verify_source: bool = True) -> Path:
    """Path of the engine for this graph, precision, TensorRT and GPU; raises if absent or stale."""
    model = resolve_model(model_dir)
    gpu = _as_gpu(gpu)
    where = _engine_dir(model, engine_dir)
    path = where / engine_name(graph, trt_version, gpu.name, gpu.compute_capability, precision)
    if path.is_file():
        record = check_engine_fresh(sidecar_path(path), trt_version, gpu, model.path)
        if verify_source:
            check_engine_source(record, model)
        return path
    others = sorted(where.glob(f"{graph}.trt*.{precision}{ENGINE_SUFFIX}"))
    for other in others:
        # Reports the first foreign engine with the same message the staleness check gives.
        check_engine_fresh(sidecar_path(other), trt_version, gpu, model.path)
    raise EngineNotFoundError(
        f"{where}: no TensorRT {precision} engine for the {graph} graph (TensorRT {trt_version}, "
        f"GPU {gpu}); build them with: {rebuild_command(model.path, precision)}")


# ---------------------------------------------------------------- TensorRT and GPU probes

def import_tensorrt():
    """The tensorrt module, or EngineError saying how to install it."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, GPU machines only
    except ImportError as exc:
        raise EngineError(
            "TensorRT is not installed (needs an NVIDIA GPU): pip install tensorrt-cu13 "
            "cuda-python (CUDA 12 drivers: tensorrt-cu12); see README, 'GPU'") from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old; cellsam-rt needs TensorRT 10+")
    return trt


def import_cudart():
    """cuda-python's runtime API module (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # noqa: PLC0415
        except ImportError as exc:
            raise EngineError("cuda-python is not installed: pip install cuda-python") from exc
    return cudart


def cuda_check(result: Any, what: str) -> Any:
    """Unwrap a cuda-python (err, value...) tuple, raising EngineError with CUDA's message on failure."""
    cudart = import_cudart()
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(err) != 0:
        _, msg = cudart.cudaGetErrorString(err)
        raise EngineError(f"CUDA error in {what}: {getattr(err, 'name', err)}: "
                          f"{msg.decode() if isinstance(msg, bytes) else msg}")
    return rest[0] if len(rest) == 1 else (rest or None)


def current_gpu(device: int = 0) -> GpuIdentity:
    """Name and compute capability of CUDA device `device` (EngineError if there is none)."""
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or not count:
        why = getattr(err, "name", err) if int(err) != 0 else "0 devices"
        raise EngineError(f"no CUDA-capable GPU is visible (CUDA: {why})")
    if not 0 <= device < count:
        raise EngineError(f"CUDA device {device} does not exist ({count} visible)")
    props = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuIdentity(name.strip(), f"{props.major}.{props.minor}")


def current_trt_version() -> str:
    """The installed TensorRT's version string (EngineError if TensorRT is missing)."""
    return str(import_tensorrt().__version__)
