"""Building TensorRT engines on this machine's GPU: FP32 islands for FP16 builds, one optimisation
profile per graph, the timing cache, and the sidecar record `engines.py` checks at load."""
from __future__ import annotations

import time

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from cellsam_rt.backends.tensorrt.engines import (DEFAULT_MAX_BATCH, DEFAULT_MAX_BOXES,
                                                  DEFAULT_WORKSPACE_GB, PRECISIONS, TYPINGS,
                                                  EngineError, _engine_dir, cuda_check,
                                                  current_gpu, engine_name, engine_record,
                                                  import_cudart, import_tensorrt, profile_shapes,
                                                  timing_cache_name, write_bytes, write_sidecar)
from cellsam_rt.config import GRAPH_NAMES
from cellsam_rt.model_dir import ModelDir, resolve_model


# ---------------------------------------------------------------- FP32 islands (pure)

@dataclass(frozen=True)
class LayerInfo:
    """A network layer reduced to what the FP32-island selection needs."""

    index: int
    # "normalization", "softmax", "reduce_mean", "sub", "pow", "add", "div", "mul", "sqrt",
    # "sin", "cos", "matmul", "conv", "constant", or "other"
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    float_outputs: bool = True


_HEAVY_KINDS = {"matmul", "conv", "normalization", "softmax"}


def select_fp32_layers(layers: Sequence[LayerInfo]) -> set[int]:
    """Indices of layers to pin to FP32 in an FP16 engine: norms, softmax, LayerNorm chains, sin/cos."""
    producer = {t: layer for layer in layers for t in layer.outputs}

    def src(layer: LayerInfo, i: int) -> LayerInfo | None:
        return producer.get(layer.inputs[i]) if i < len(layer.inputs) else None

    keep = {l.index for l in layers if l.kind in ("normalization", "softmax")}
    # Hand-written LayerNorm (SAM's LayerNorm2d): (x - mean) / sqrt(mean((x - mean)^2) + eps).
    for div in layers:
        if div.kind != "div":
            continue
        sqrt = src(div, 1)
        add = src(sqrt, 0) if sqrt and sqrt.kind == "sqrt" else None
        if add is None or add.kind != "add":
            continue
        var = next((p for i in range(len(add.inputs)) if (p := src(add, i)) and p.kind == "reduce_mean"), None)
        square = src(var, 0) if var else None
        if square is None or square.kind not in ("pow", "mul"):
            continue
        sub = src(square, 0)
        if sub is None or sub.kind != "sub":
            continue
        chain = [div, sqrt, add, var, square, sub]
        mean = src(sub, 1)
        if mean is not None and mean.kind == "reduce_mean":
            chain.append(mean)
        numerator = src(div, 0)
        if numerator is not None and numerator.kind == "sub":
            chain.append(numerator)
        keep.update(l.index for l in chain)
    # Sinusoidal position encodings: arguments reach tens of radians, where FP16 spacing shifts
    # the phase; keep sin/cos and the coordinate arithmetic feeding them, up to a heavy layer.
    stack = [l for l in layers if l.kind in ("sin", "cos")]
    seen: set[int] = set()
    while stack:
        layer = stack.pop()
        if layer.index in seen:
            continue
        seen.add(layer.index)
        if layer.kind in _HEAVY_KINDS or layer.kind == "constant":
            continue
        keep.add(layer.index)
        stack.extend(p for t in layer.inputs if (p := producer.get(t)) is not None)
    by_index = {l.index: l for l in layers}
    return {i for i in keep if by_index[i].float_outputs}


# ---------------------------------------------------------------- building (needs a GPU)

def _trt_layer_infos(network: Any, trt: Any) -> list[LayerInfo]:
    """The network's layers as LayerInfo (casting each to its concrete class to read its op)."""
    elementwise = {trt.ElementWiseOperation.SUB: "sub", trt.ElementWiseOperation.POW: "pow",
                   trt.ElementWiseOperation.SUM: "add", trt.ElementWiseOperation.DIV: "div",
                   trt.ElementWiseOperation.PROD: "mul"}
    unary = {trt.UnaryOperation.SQRT: "sqrt", trt.UnaryOperation.SIN: "sin",
             trt.UnaryOperation.COS: "cos"}
    plain = {trt.LayerType.NORMALIZATION: "normalization", trt.LayerType.SOFTMAX: "softmax",
             trt.LayerType.MATRIX_MULTIPLY: "matmul", trt.LayerType.CONVOLUTION: "conv",
             trt.LayerType.CONSTANT: "constant"}
    floats = {trt.float32, trt.float16}
    infos = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = plain.get(layer.type, "other")
        if layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            kind = elementwise.get(layer.op, "other")
        elif layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer
            kind = unary.get(layer.op, "other")
        elif layer.type == trt.LayerType.REDUCE:
            layer.__class__ = trt.IReduceLayer
            kind = "reduce_mean" if layer.op == trt.ReduceOperation.AVG else "other"
        ins = tuple(t.name for j in range(layer.num_inputs) if (t := layer.get_input(j)) is not None)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        infos.append(LayerInfo(i, kind, ins, tuple(t.name for t in outs),
                               bool(outs) and all(t.dtype in floats for t in outs)))
    return infos


def _pin_fp32(network: Any, trt: Any) -> int:
    """Constrain the normalisation/softmax/sin-cos layers of a weakly typed network to FP32."""
    chosen = select_fp32_layers(_trt_layer_infos(network, trt))
    for i in chosen:
        layer = network.get_layer(i)
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
    return len(chosen)


def resolve_typing(typing: str, trt: Any) -> str:
    """"weak" where TensorRT still has the FP16 builder flag (10.x), else "strong" (11+)."""
    if typing not in TYPINGS:
        raise ValueError(f"typing must be one of {', '.join(TYPINGS)}, got {typing!r}")
    weak_ok = hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")
    if typing == "weak" and not weak_ok:
        raise EngineError(f"TensorRT {trt.__version__} has no weak typing (FP16 builder flag); "
                          "use --typing strong")
    if typing == "auto":
        return "weak" if weak_ok else "strong"
    return typing


def _make_logger(trt: Any, verbose: bool) -> Any:
    """A TensorRT logger that keeps warnings and errors so build failures can quote them."""
    threshold = int(trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING)

    class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= threshold:
                self.lines.append(f"{getattr(severity, 'name', level)}: {msg}")
                if verbose or level <= int(trt.ILogger.Severity.ERROR):
                    print(f"[TensorRT] {msg}", flush=True)

    return Logger()


def build_engine(model: ModelDir, graph: str, precision: str = "fp16",
                 max_batch: int = DEFAULT_MAX_BATCH, max_boxes: int = DEFAULT_MAX_BOXES,
                 workspace_gb: float = DEFAULT_WORKSPACE_GB, timing_cache: Any = None,
                 engine_dir: Any = None, typing: str = "auto", opt_batch: int | None = None,
                 opt_boxes: int | None = None, device: int = 0, verbose: bool = False,
                 log: Callable[[str], None] = print, opt_level: int | None = None) -> Path:
    """Build and atomically write one graph's engine and its sidecar; return the engine path."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
    trt = import_tensorrt()
    cudart = import_cudart()
    gpu = current_gpu(device)
    cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
    typing = resolve_typing(typing, trt)
    # Strong typing takes each layer's type from the graph: FP16 engines come from *.fp16.onnx.
    source_precision = "fp16" if (precision == "fp16" and typing == "strong") else "fp32"
    try:
        onnx_path = model.graph_path(graph, source_precision)
    except Exception as exc:  # noqa: BLE001
        raise EngineError(f"{model.manifest_path}: cannot build the {precision} {graph} engine: {exc}"
                          + ("; re-export the model with FP16 graphs" if source_precision == "fp16" else "")) from exc
    out_dir = _engine_dir(model, engine_dir)
    out = out_dir / engine_name(graph, trt.__version__, gpu.name, gpu.compute_capability, precision)
    shapes = profile_shapes(model, graph, max_batch, max_boxes, opt_batch, opt_boxes)

    logger = _make_logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 0
    if typing == "strong" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT {trt.__version__}'s ONNX parser rejected the "
                          f"{graph} graph:\n  {errors or 'no error recorded'}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(shapes):
        raise EngineError(f"{onnx_path}: inputs {names} differ from the {graph} graph's "
                          f"contract {sorted(shapes)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if opt_level is not None:  # 0-5; below 3 builds faster with a narrower tactic search
        config.builder_optimization_level = int(opt_level)
    pinned = 0
    if precision == "fp16" and typing == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32(network, trt)

    if timing_cache is False:
        cache_path = None
    else:
        cache_path = Path(timing_cache) if timing_cache else \
            out_dir / timing_cache_name(trt.__version__, gpu.name, gpu.compute_capability)
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log(f"warning: {cache_path} does not fit this TensorRT/GPU; starting a fresh cache")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    log(f"building {out.name} from {onnx_path.name} ({typing} typing"
        + (f", {pinned} layers pinned to FP32" if pinned else "") + ") ...")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        tail = "\n  ".join(logger.lines[-10:])
        raise EngineError(f"{onnx_path}: TensorRT failed to build the {graph} engine:\n  {tail}")
    if cache_path is not None:
        write_bytes(cache_path, config.get_timing_cache().serialize())
    record = engine_record(model, graph, precision, str(trt.__version__), gpu, shapes,
                           typing=typing, source_precision=source_precision,
                           max_batch=max_batch, max_boxes=max_boxes, fp32_pinned_layers=pinned,
                           workspace_gb=workspace_gb, build_seconds=seconds,
                           builder_optimization_level=config.builder_optimization_level,
                           cuda_runtime=_cuda_runtime_version(cudart))
    # Engine first, then its record: a reader that finds the record always finds its engine.
    write_bytes(out, serialized)
    write_sidecar(out, record)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {seconds:.0f} s)")
    return out


def _cuda_runtime_version(cudart: Any) -> str:
    err, version = cudart.cudaRuntimeGetVersion()
    return f"{version // 1000}.{(version % 1000) // 10}" if int(err) == 0 else "unknown"


def build_engines(model_dir: Any, precision: str = "fp16", max_batch: int = DEFAULT_MAX_BATCH,
                  max_boxes: int = DEFAULT_MAX_BOXES, workspace_gb: float = DEFAULT_WORKSPACE_GB,
                  timing_cache: Any = None, graphs: Iterable[str] = GRAPH_NAMES,
                  engine_dir: Any = None, typing: str = "auto", opt_batch: int | None = None,
                  opt_boxes: int | None = None, device: int = 0, verbose: bool = False,
                  log: Callable[[str], None] = print,
                  opt_level: int | None = None) -> dict[str, Path]:
    """Build TensorRT engines for a model directory's graphs on this machine's GPU."""
    model = resolve_model(model_dir)
    return {g: build_engine(model, g, precision, max_batch, max_boxes, workspace_gb, timing_cache,
                            engine_dir, typing, opt_batch, opt_boxes, device, verbose, log,
                            opt_level)
            for g in graphs}

