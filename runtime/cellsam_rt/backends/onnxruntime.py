"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers, one lazy session per graph."""
from __future__ import annotations

import os
import threading
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from cellsam_rt import kernels as ops
from cellsam_rt.model_dir import GRAPH_NAMES, ModelDir, resolve_model
from cellsam_rt.backends.base import Backend, BackendError

DEVICES = ("cpu", "cuda", "tensorrt")
_PRIMARY_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                     "tensorrt": "TensorrtExecutionProvider"}
# What each device asks onnxruntime for, most preferred first.
_PROVIDER_CHAIN = {"cpu": ("CPUExecutionProvider",),
                   "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
                   "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                "CPUExecutionProvider")}
# Without an arena every run page-faults its activations afresh (about 1 GB per full-size trunk
# run) and every decoder call its buffers: kernel time on every run. Per-session arenas keep each
# graph's peak resident; one arena shared by all sessions keeps only the largest. Measured
# trade-offs: docs/performance.md (memory).
ARENA_MODES = ("shared", "per-graph", "decoder", "off")
CPU_SLOWER_FUSIONS = ("SkipLayerNormFusion",)
_SHARED_ARENA = {"lock": threading.Lock(), "ready": None}


def _shared_cpu_arena() -> bool:
    """Register the process-wide CPU arena that sessions opt into (once); False if refused."""
    with _SHARED_ARENA["lock"]:
        if _SHARED_ARENA["ready"] is None:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            try:
                # max memory unlimited; ORT's defaults for growth and fragmentation
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
                _SHARED_ARENA["ready"] = True
            except Exception as exc:  # e.g. another library registered one: use per-graph
                warnings.warn(f"shared onnxruntime CPU arena unavailable ({_first_line(exc)}); "
                              "each session keeps its own", RuntimeWarning, stacklevel=3)
                _SHARED_ARENA["ready"] = False
        return bool(_SHARED_ARENA["ready"])


# On the CPU a decoder call costs the same per box from 2 to 32 boxes once its buffers are
# reused (ONNX Runtime's arena); a few boxes per call keep those buffers small.
CPU_DECODER_CHUNK = 4
#: windowed-decoder calls run side by side on the CPU at most (each holds its own buffers)
MAX_CONCURRENT_RUNS = 4
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (a CPU wheel has no CUDA/TensorRT)."""
    return list(ort.get_available_providers())


def onnxruntime_package() -> str:
    """Installed onnxruntime distribution with version, e.g. "onnxruntime-gpu 1.20.1"."""
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return f"onnxruntime {ort.__version__}"


def default_trt_cache_dir(model: ModelDir) -> Path:
    """Per-user folder for TensorRT EP engine and timing caches (model folders may be read-only)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "cellsam-rt" / "trt-ep" / model.name


def _range(value: Sequence[int] | int, what: str) -> tuple[int, int, int]:
    """Normalise a (min, opt, max) triple; a single int means (1, n, n)."""
    triple = (1, int(value), int(value)) if isinstance(value, (int, np.integer)) else tuple(map(int, value))
    if len(triple) != 3 or not 1 <= triple[0] <= triple[1] <= triple[2]:
        raise BackendError(f"{what} profile must be min <= opt <= max, all >= 1, got {value!r}")
    return triple  # type: ignore[return-value]


class OrtBackend(Backend):
    """Runs the model directory's ONNX graphs with onnxruntime on CPU, CUDA or TensorRT EP."""

    def __init__(self, model_dir: "ModelDir | str | Path", device: str = "cpu",
                 precision: str = "fp32", threads: int | None = None,
                 inter_op_threads: int | None = None, graph_optimization_level: str = "all",
                 trt_engine_cache_dir: "str | Path | None" = None, trt_fp16: bool | None = None,
                 trt_batch: Sequence[int] | int = (1, 1, 4),
                 trt_tiles: Sequence[int] | int = (1, 1, 16),
                 trt_boxes: Sequence[int] | int = (1, 256, 4096),
                 cuda_device_id: int = 0, require_device: bool = True,
                 arena: str = "shared", fused_attention: bool = True):
        """Check the request against this onnxruntime build; sessions are made on first use.

        arena: how ONNX Runtime keeps freed CPU buffers for reuse (ARENA_MODES): "shared" (one
        arena for every CPU-device session of the process; the default; GPU devices get one per
        session), "per-graph", "decoder" (the decoder only: the least memory held between runs)
        or "off".

        fused_attention: on the CPU, run the model directory's `cpu_graphs` (trunks whose
        attention is one com.microsoft.MultiHeadAttention node, a flash attention in ONNX
        Runtime, or for global blocks cellsam-rt's com.cellsam.RelPosAttention kernel; same
        weights, FP32 differences ~1e-6) where it has them and can run them: graphs that need
        cellsam_rt.kernels where it is not built or usable give way to the plain graphs (warned).
        """
        self.model = resolve_model(model_dir)
        if device not in DEVICES:
            raise BackendError(f"unknown onnxruntime device {device!r} (expected {', '.join(DEVICES)})")
        if precision not in self.model.precisions:
            raise BackendError(f"{self.model.manifest_path}: model has no {precision} graphs "
                               f"(available: {', '.join(self.model.precisions)})")
        if graph_optimization_level not in _OPT_LEVELS:
            raise BackendError(f"unknown graph optimization level {graph_optimization_level!r} "
                               f"(expected {', '.join(_OPT_LEVELS)})")
        if threads is not None and threads < 1:
            raise BackendError(f"threads must be >= 1, got {threads}")
        self.device = device
        self.precision = precision
        self.threads = threads
        self.inter_op_threads = inter_op_threads
        self.graph_optimization_level = graph_optimization_level
        self.require_device = require_device
        if arena not in ARENA_MODES:
            raise BackendError(f"unknown arena mode {arena!r} (expected {', '.join(ARENA_MODES)})")
        self.arena = arena
        self.fused_attention = bool(fused_attention)
        self._kernels_warned = False
        self.cuda_device_id = cuda_device_id
        self.trt_fp16 = (precision == "fp16") if trt_fp16 is None else bool(trt_fp16)
        self.trt_engine_cache_dir = (Path(trt_engine_cache_dir) if trt_engine_cache_dir
                                     else default_trt_cache_dir(self.model))
        self.trt_batch = _range(trt_batch, "trt batch (B)")
        self.trt_tiles = _range(trt_tiles, "trt tiles (T)")
        self.trt_boxes = _range(trt_boxes, "trt boxes (N)")
        self.name = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "tensorrt-ep"}[device]
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()

        wanted = _PRIMARY_PROVIDER[device]
        have = available_providers()
        if wanted not in have:
            message = (f"backend {self.name} requested but {onnxruntime_package()} has no "
                       f"{wanted} (available: {', '.join(have)}); install onnxruntime-gpu in place of "
                       "onnxruntime (pip install 'cellsam-rt[gpu]') on a machine with CUDA")
            if require_device:
                raise BackendError(message)
            warnings.warn(message + "; running on CPU", RuntimeWarning, stacklevel=2)
            self.device, self.name = "cpu", "cpu"

    @property
    def decoder_chunk_size(self) -> int:  # type: ignore[override]
        """Boxes per decoder call: CPU_DECODER_CHUNK on the CPU, Backend's default on GPUs."""
        return CPU_DECODER_CHUNK if self.device == "cpu" else Backend.decoder_chunk_size

    def concurrent_runs(self, graph: str) -> int:  # type: ignore[override]
        """On the CPU the windowed decoder's calls run side by side, each on fewer threads:
        its small matmuls keep two threads of one call busier apart than together."""
        if self.device != "cpu" or graph != "decoder_window":
            return 1
        return max(1, min(MAX_CONCURRENT_RUNS, self.threads or os.cpu_count() or 1))

    # -- sessions ---------------------------------------------------------------------------

    def _session_options(self, graph: str) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        runs = self.concurrent_runs(graph)
        opts.intra_op_num_threads = (max(1, (self.threads or os.cpu_count() or 1) // runs)
                                     if runs > 1 else self.threads or 0)
        opts.inter_op_num_threads = self.inter_op_threads or 0
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                _OPT_LEVELS[self.graph_optimization_level])
        # Errors only: we report provider fallback ourselves, in one line.
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = self.arena != "off" and (self.arena != "decoder"
                                                             or graph.startswith("decoder"))
        # The process-wide arena is measured on the CPU only; GPU sessions keep their own.
        if self.arena == "shared" and self.device == "cpu" and _shared_cpu_arena():
            opts.add_session_config_entry("session.use_env_allocators", "1")
        # INT8 graphs quantised from the CPU graphs call the kernels too, hence every session.
        if self.device == "cpu" and self.model.cpu_custom_ops and self._cpu_kernels()[0]:
            ops.register(opts)
        return opts

    def _cpu_kernels(self) -> tuple[bool, str]:
        """(usable, why not): whether cellsam_rt.kernels serves every op the CPU graphs call."""
        absent = ops.missing(self.model.cpu_custom_ops)
        if absent:
            return False, f"this cellsam-rt has no kernel for {', '.join(absent)}"
        return ops.status() if self.model.cpu_custom_ops else (True, "")

    def _disabled_optimizers(self) -> list[str]:
        """Graph rewrites that make the CPU slower: ONNX Runtime's CPU SkipLayerNormalization
        kernel is slower than the Add + LayerNormalization it replaces (docs/performance.md);
        it sits in the mask decoder and the Anchor-DETR head."""
        return list(CPU_SLOWER_FUSIONS) if self.device == "cpu" else []

    def _trt_profile(self, graph: str) -> tuple[str, str, str]:
        """TensorRT EP min/opt/max shape strings for one graph's dynamic inputs."""
        s = self.model.image_size
        c, h, w = self.model.embedding_shape
        shapes = []
        for i in range(3):
            if graph in ("encoder", "cellfinder"):
                shapes.append(f"image:{self.trt_batch[i]}x3x{s}x{s}")
            else:
                t, n = self.trt_tiles[i], self.trt_boxes[i]
                shapes.append(f"embeddings:{t}x{c}x{h}x{w},boxes:{n}x4,box_image:{n}")
        return shapes[0], shapes[1], shapes[2]

    def _providers_for(self, graph: str) -> list[Any]:
        cuda = ("CUDAExecutionProvider", {"device_id": self.cuda_device_id})
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        if self.device == "cuda":
            return [cuda, "CPUExecutionProvider"]
        cache = self.trt_engine_cache_dir / self.precision
        cache.mkdir(parents=True, exist_ok=True)
        lo, opt, hi = self._trt_profile(graph)
        trt = ("TensorrtExecutionProvider", {
            "device_id": self.cuda_device_id,
            "trt_fp16_enable": self.trt_fp16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": lo,
            "trt_profile_opt_shapes": opt,
            "trt_profile_max_shapes": hi,
        })
        # CUDA then CPU take the nodes TensorRT cannot.
        return [trt, cuda, "CPUExecutionProvider"]

    def session(self, graph: str) -> ort.InferenceSession:
        """The session for `graph`, created on first use."""
        if graph not in GRAPH_NAMES and not self.has_graph(graph):
            raise BackendError(f"unknown graph {graph!r} (graphs are {', '.join(GRAPH_NAMES)})")
        sess = self._sessions.get(graph)
        if sess is not None:
            return sess
        with self._lock:
            if graph in self._sessions:
                return self._sessions[graph]
            path = self.graph_file(graph)
            try:
                sess = ort.InferenceSession(str(path), sess_options=self._session_options(graph),
                                            providers=self._providers_for(graph),
                                            disabled_optimizers=self._disabled_optimizers())
            except Exception as exc:  # ORT raises its own pybind exception types
                usable, why = self._cpu_kernels()
                hint = "" if usable else (f" (the model's CPU graphs call "
                                          f"{', '.join(self.model.cpu_custom_ops)}: {why})")
                raise BackendError(f"{path}: onnxruntime cannot load this graph: "
                                   f"{_first_line(exc)}{hint}") from exc
            self._check_fallback(graph, sess)
            self._sessions[graph] = sess
            return sess

    def graph_file(self, graph: str) -> Path:
        """The file this backend runs for `graph`: the CPU variant where there is one and it
        applies, else the manifest's graph of this precision."""
        plain = self.model.graph_path(graph, self.precision)
        if self.device == "cpu" and self.fused_attention:
            cpu = self.model.cpu_graph_path(graph, self.precision)
            if cpu is not None:
                usable, why = self._cpu_kernels()
                if usable:
                    return cpu
                if not self._kernels_warned:
                    self._kernels_warned = True
                    warnings.warn(f"{self.model.manifest_path}: the CPU graphs call "
                                  f"{', '.join(self.model.cpu_custom_ops)}, but {why}; running "
                                  "the plain graphs (slower attention)", RuntimeWarning,
                                  stacklevel=3)
        return plain

    def _check_fallback(self, graph: str, sess: ort.InferenceSession) -> None:
        """ORT silently drops a GPU provider that fails to load; catch that here."""
        wanted = _PRIMARY_PROVIDER[self.device]
        got = sess.get_providers()
        if wanted in got:
            return
        message = (f"{graph} graph: onnxruntime fell back to {', '.join(got)} although "
                   f"{wanted} was requested (the provider failed to load: check the CUDA, cuDNN "
                   "and TensorRT libraries named in the onnxruntime log above)")
        if self.require_device:
            raise BackendError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def load(self, graphs: Sequence[str] = GRAPH_NAMES) -> None:
        """Create the sessions now (e.g. to keep load time out of a benchmark)."""
        for graph in graphs:
            self.session(graph)

    # -- Backend interface ------------------------------------------------------------------

    @property
    def providers(self) -> list[str]:
        """Providers in use (from a live session when one exists, else those requested)."""
        for sess in self._sessions.values():
            return list(sess.get_providers())
        return list(_PROVIDER_CHAIN[self.device])

    def has_graph(self, graph: str) -> bool:
        """Every required graph, and an optional one where the model directory has it."""
        return graph in GRAPH_NAMES or self.model.has_graph(graph, self.precision)

    def graph_inputs(self, graph: str) -> tuple[str, ...]:
        """Names of `graph`'s inputs (from its session)."""
        return tuple(i.name for i in self.session(graph).get_inputs())

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `graph` on `inputs` and return its outputs by name."""
        sess = self.session(graph)
        expected = [i.name for i in sess.get_inputs()]
        missing = [n for n in expected if n not in inputs]
        extra = [n for n in inputs if n not in expected]
        if missing or extra:
            raise BackendError(f"{graph} graph takes inputs {expected}; "
                               f"missing {missing}, unexpected {extra}")
        try:
            values = sess.run(None, {n: inputs[n] for n in expected})
        except Exception as exc:  # ORT raises its own pybind exception types
            raise BackendError(f"{graph} graph failed on {self.name}: {_first_line(exc)}") from exc
        return {o.name: v for o, v in zip(sess.get_outputs(), values)}

    def describe(self) -> str:
        """One line: onnxruntime version, device, precision, providers, threads."""
        threads = self.threads if self.threads else "auto"
        text = (f"{onnxruntime_package()} {self.name} {self.precision} "
                f"[{', '.join(self.providers)}] threads={threads}")
        fused = [g for g in GRAPH_NAMES if self.graph_file(g) != self.model.graph_path(g, self.precision)]
        if fused:
            text += f" fused-attention={','.join(fused)}"
            if self.model.cpu_custom_ops:
                text += " kernels=" + ",".join(o.split(".")[-1] for o in self.model.cpu_custom_ops)
        text += f" arena={self.arena}"
        if self.device == "tensorrt":
            text += f" trt_fp16={self.trt_fp16} cache={self.trt_engine_cache_dir}"
        return text

    def close(self) -> None:
        """Drop all sessions (they are recreated on the next run)."""
        with self._lock:
            self._sessions.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
