"""Native TensorRT backend: prebuilt engines run through TensorRT's Python API and cuda-python.

No PyTorch, no CuPy: device and pinned host buffers come from the CUDA runtime API
(`cuda.bindings.runtime`), sized once for each engine profile's largest shapes and reused by
every call; one CUDA stream carries the host-to-device copies, `execute_async_v3` and the
device-to-host copies. Inputs larger than the profile are run in pieces (images in batches of
`max_batch`, decoder boxes in chunks of `max_boxes`) so callers never see the limits.

Engines are built on the machine that runs them (`cellsam-rt build-engines MODEL`); an engine
for another TensorRT or GPU is refused with the command that rebuilds it (see engines.py).
Importing this module needs neither tensorrt nor cuda-python; creating the backend does.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cellsam_rt.backends.tensorrt.engines import (EngineMismatchError, cuda_check, current_gpu, find_engine,
                       import_cudart, import_tensorrt, rebuild_command)
from cellsam_rt.model_dir import GRAPH_NAMES, resolve_model
from cellsam_rt.backends.base import Backend, BackendError

# ---------------------------------------------------------------- splitting (pure, tested on CPU)


def batch_chunks(n: int, max_batch: int) -> list[slice]:
    """Consecutive slices of at most `max_batch` covering range(n)."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    return [slice(i, min(i + max_batch, n)) for i in range(0, n, max_batch)]


def decoder_chunks(box_image: np.ndarray, num_images: int, max_images: int,
                   max_boxes: int) -> list[tuple[slice, np.ndarray | None]]:
    """Split boxes into consecutive chunks that fit the decoder profile, in order.

    Each chunk is (box slice, image ids): image ids is None when all `num_images` embeddings fit
    the profile and can be passed as they are; otherwise it lists the (at most `max_images`)
    embeddings the chunk's boxes use, and box_image must be remapped into that list.
    """
    box_image = np.asarray(box_image)
    if box_image.size and (box_image.min() < 0 or box_image.max() >= num_images):
        raise BackendError(f"decoder: box_image values must lie in [0, {num_images}) "
                           f"(got {box_image.min()}..{box_image.max()})")
    if num_images <= max_images:
        return [(s, None) for s in batch_chunks(len(box_image), max_boxes)]
    chunks, start, used = [], 0, set()
    for i, img in enumerate(box_image.tolist()):
        if i - start == max_boxes or (img not in used and len(used) == max_images):
            chunks.append((slice(start, i), np.array(sorted(used), dtype=np.int64)))
            start, used = i, set()
        used.add(img)
    if start < len(box_image):
        chunks.append((slice(start, len(box_image)), np.array(sorted(used), dtype=np.int64)))
    return chunks


# ---------------------------------------------------------------- one engine


class _EngineSession:
    """One deserialised engine with its execution context and buffers for the profile maximum."""

    def __init__(self, trt: Any, cudart: Any, runtime: Any, path: Path, stream: Any,
                 model_path: Path, precision: str):
        self.path, self._cudart, self._stream = path, cudart, stream
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineMismatchError(f"{path}: TensorRT {trt.__version__} could not deserialise "
                                      f"this engine; rebuild with: "
                                      f"{rebuild_command(model_path, precision)}")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{path}: TensorRT could not create an execution context "
                               "(out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtype = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.min_shape: dict[str, tuple[int, ...]] = {}
        self.max_shape: dict[str, tuple[int, ...]] = {}
        for n in self.inputs:
            lo, _, hi = engine.get_tensor_profile_shape(n, 0)
            self.min_shape[n], self.max_shape[n] = tuple(lo), tuple(hi)
            self.context.set_input_shape(n, self.max_shape[n])
        for n in self.outputs:  # every output grows with its inputs: the max inputs bound it
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise BackendError(f"{path}: output {n} has a data-dependent shape {shape}; "
                                   "not supported")
            self.max_shape[n] = shape
        self._device: dict[str, int] = {}
        self._host_ptr: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        try:
            for n in names:
                nbytes = int(np.prod(self.max_shape[n])) * self.dtype[n].itemsize
                self._device[n] = int(cuda_check(cudart.cudaMalloc(nbytes), f"cudaMalloc {n}"))
                # Pinned host memory: DMA straight from/to it, so copies are truly asynchronous.
                ptr = int(cuda_check(cudart.cudaHostAlloc(nbytes, cudart.cudaHostAllocDefault),
                                     f"cudaHostAlloc {n}"))
                self._host_ptr[n] = ptr
                raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
                self.host[n] = np.frombuffer(raw, dtype=np.uint8).view(self.dtype[n])
                if not self.context.set_tensor_address(n, self._device[n]):
                    raise BackendError(f"{path}: set_tensor_address failed for {n}")
        except BaseException:
            self.free()
            raise

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse an input whose fixed dimensions or rank do not match the engine."""
        lo, hi = self.min_shape[name], self.max_shape[name]
        if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
            raise BackendError(f"{self.path.name}: input {name} has shape {shape}; this engine "
                               f"takes {lo} to {hi} (rebuild with larger --max-batch/--max-boxes)")

    def run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One execution within the profile: copy in, enqueue, copy out, wait."""
        cudart, stream = self._cudart, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n in self.inputs:
            a = arrays[n]
            self.check(n, a.shape)
            staged = self.host[n][: a.size].reshape(a.shape)
            np.copyto(staged, a, casting="same_kind")
            cuda_check(cudart.cudaMemcpyAsync(self._device[n], self._host_ptr[n], staged.nbytes,
                                              h2d, stream), f"copy {n} to GPU")
            if not self.context.set_input_shape(n, a.shape):
                raise BackendError(f"{self.path.name}: TensorRT refused shape {a.shape} for {n}")
        if not self.context.execute_async_v3(int(stream)):
            raise BackendError(f"{self.path.name}: execute_async_v3 failed (see TensorRT's log)")
        shapes = {}
        for n in self.outputs:
            shapes[n] = tuple(self.context.get_tensor_shape(n))
            nbytes = int(np.prod(shapes[n])) * self.dtype[n].itemsize
            cuda_check(cudart.cudaMemcpyAsync(self._host_ptr[n], self._device[n], nbytes, d2h,
                                              stream), f"copy {n} from GPU")
        cuda_check(cudart.cudaStreamSynchronize(stream), f"{self.path.name}: inference")
        # Copies: the pinned buffers are overwritten by the next call.
        return {n: self.host[n][: int(np.prod(s))].reshape(s).copy() for n, s in shapes.items()}

    def empty_outputs(self) -> dict[str, np.ndarray]:
        """Outputs for a zero-size batch (TensorRT profiles start at 1)."""
        return {n: np.zeros((0,) + self.max_shape[n][1:], self.dtype[n]) for n in self.outputs}

    def free(self) -> None:
        """Release device and pinned host buffers and the context."""
        cudart = self._cudart
        self.host.clear()
        for ptr in self._host_ptr.values():
            cudart.cudaFreeHost(ptr)
        for ptr in self._device.values():
            cudart.cudaFree(ptr)
        self._host_ptr.clear()
        self._device.clear()
        self.context = None
        self.engine = None


# ---------------------------------------------------------------- the backend


class TensorRTBackend(Backend):
    """Runs the model's graphs as TensorRT engines built for this TensorRT and GPU."""

    name = "tensorrt"

    def __init__(self, model_dir: Any, precision: str = "fp16", device: int = 0,
                 engine_dir: Any = None, verify_source: bool = True,
                 graphs: Iterable[str] = GRAPH_NAMES):
        self.model = resolve_model(model_dir)
        self.precision, self.device = precision, device
        self._trt = import_tensorrt()
        self._cudart = import_cudart()
        self.gpu = current_gpu(device)
        self.trt_version = str(self._trt.__version__)
        # Refuse missing or stale engines now, with the rebuild command, not at the first image.
        self.engine_paths = {g: find_engine(self.model, g, precision, self.trt_version, self.gpu,
                                            engine_dir, verify_source) for g in graphs}
        self._lock = threading.Lock()
        self._sessions: dict[str, _EngineSession] = {}
        self._stream = None
        self._runtime = None
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)

    @property
    def providers(self) -> list[str]:
        """TensorRT version and GPU, e.g. ["TensorRT 10.8.0.43", "NVIDIA H100 (sm90)"]."""
        return [f"TensorRT {self.trt_version}", str(self.gpu)]

    def describe(self) -> str:
        """One line: backend, TensorRT version, GPU and engine precision."""
        return f"{self.name} (TensorRT {self.trt_version}, {self.gpu}, {self.precision} engines)"

    def _session(self, graph: str) -> _EngineSession:
        if graph not in self.engine_paths:
            raise BackendError(f"tensorrt: unknown graph {graph!r} "
                               f"(loaded: {', '.join(self.engine_paths)})")
        if graph not in self._sessions:
            cudart = self._cudart
            cuda_check(cudart.cudaSetDevice(self.device), "cudaSetDevice")
            if self._stream is None:
                self._stream = cuda_check(
                    cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
            if self._runtime is None:
                self._runtime = self._trt.Runtime(self._logger)
            self._sessions[graph] = _EngineSession(self._trt, cudart, self._runtime,
                                                   self.engine_paths[graph], self._stream,
                                                   self.model.path, self.precision)
        return self._sessions[graph]

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `graph`, splitting inputs larger than the engine profile into pieces."""
        with self._lock:
            sess = self._session(graph)
            missing = set(sess.inputs) - set(inputs)
            if missing:
                raise BackendError(f"tensorrt {graph}: missing inputs {sorted(missing)}")
            arrays = {n: np.ascontiguousarray(inputs[n], dtype=sess.dtype[n]) for n in sess.inputs}
            if graph == "decoder":
                return self._run_decoder(sess, arrays)
            return self._run_batched(sess, arrays)

    @staticmethod
    def _run_batched(sess: _EngineSession, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = arrays[sess.inputs[0]].shape[0]
        if n == 0:
            return sess.empty_outputs()
        cap = min(sess.max_shape[i][0] for i in sess.inputs)
        if n <= cap:
            return sess.run(arrays)
        parts = [sess.run({k: v[s] for k, v in arrays.items()}) for s in batch_chunks(n, cap)]
        return {o: np.concatenate([p[o] for p in parts]) for o in sess.outputs}

    @staticmethod
    def _run_decoder(sess: _EngineSession, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb, boxes, box_image = arrays["embeddings"], arrays["boxes"], arrays["box_image"]
        if len(boxes) != len(box_image):
            raise BackendError(f"decoder: {len(boxes)} boxes but {len(box_image)} box_image entries")
        if len(boxes) == 0:
            return sess.empty_outputs()
        chunks = decoder_chunks(box_image, len(emb), sess.max_shape["embeddings"][0],
                                sess.max_shape["boxes"][0])
        parts = []
        for s, images in chunks:
            if images is None:
                part = {"embeddings": emb, "boxes": boxes[s], "box_image": box_image[s]}
            else:
                remap = np.searchsorted(images, box_image[s]).astype(box_image.dtype)
                part = {"embeddings": emb[images], "boxes": boxes[s], "box_image": remap}
            parts.append(sess.run(part))
        if len(parts) == 1:
            return parts[0]
        return {o: np.concatenate([p[o] for p in parts]) for o in sess.outputs}

    def close(self) -> None:
        """Free engines, buffers and the stream; the next run reloads them."""
        with self._lock:
            for sess in self._sessions.values():
                sess.free()
            self._sessions.clear()
            if self._stream is not None:
                self._cudart.cudaStreamDestroy(self._stream)
                self._stream = None
            self._runtime = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may already be gone
            pass


def create(model_dir: Any, precision: str = "fp16", **options: Any) -> TensorRTBackend:
    """The TensorRT backend for `model_dir` (BackendError if TensorRT, CUDA or engines are missing)."""
    try:
        return TensorRTBackend(model_dir, precision=precision, **options)
    except BackendError:
        raise
    except (OSError, RuntimeError) as exc:
        raise BackendError(f"tensorrt backend: {exc}") from exc


__all__ = ["TensorRTBackend", "batch_chunks", "create", "decoder_chunks"]
