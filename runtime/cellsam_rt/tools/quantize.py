"""`cellsam-rt quantize`: INT8 ViT trunks for CPU inference (opt-in, parity loss measured).

ONNX Runtime's dynamic quantisation turns every MatMul with a constant weight into an INT8
matrix product whose activations are quantised per call (uint8, one scale per tensor) and whose
weights are stored as int8, one scale per output channel (--per-tensor: one per matrix; same
speed, larger error). On CPUs with AMX-INT8 or VNNI ONNX Runtime runs them much faster than FP32,
but they are only part of the trunks: attention (both operands computed), LayerNorm and GELU
stay FP32. Where the model directory has fused-attention CPU graphs (`cpu_graphs`), those are
quantised, so INT8 and the flash attention add up.

Only the encoder and CellFinder trunks are quantised by default: they hold ~99 % of the FLOPs.
The mask decoder stays FP32 (the `int8` precision entry points at the FP32 decoder file): it is
cheap, and mask edges are what users see. The parity loss is the user's call to accept: see
docs/performance.md (INT8) for the measured embedding/logit error and mask IoU against FP32.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from cellsam_rt.config import OPTIONAL_GRAPHS
from cellsam_rt.model_dir import GRAPH_NAMES, ModelDir, resolve_model

PRECISION = "int8"
DEFAULT_GRAPHS = ("encoder", "cellfinder")
DEFAULT_OP_TYPES = ("MatMul",)


class QuantizeError(RuntimeError):
    """Quantisation that cannot be done; the message says why."""


def int8_file_name(graph: str) -> str:
    """File name of a graph's INT8 version inside the model directory."""
    return f"{graph}.int8.onnx"


def quantize_graph(src: "str | Path", dst: "str | Path", per_channel: bool = True,
                   op_types: Sequence[str] = DEFAULT_OP_TYPES,
                   weights_only: bool = True) -> Path:
    """Write a dynamically quantised (INT8 weights, uint8 activations) copy of an ONNX graph.

    weights_only=False also quantises MatMuls of two computed operands (attention scores and
    attention x values), both sides uint8 per tensor: less exact (docs/performance.md).
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # onnxruntime.quantization needs the onnx package
        raise QuantizeError(f"INT8 quantisation needs the onnx package (pip install onnx): "
                            f"{exc}") from exc
    import logging
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.part")
    # The quantiser logs (root logger) that a pre-processing pass is recommended; it would not
    # change these graphs, so that warning is silenced for the call only.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(str(src), str(tmp), op_types_to_quantize=list(op_types),
                         per_channel=per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=_position_table_products(src),
                         extra_options={"MatMulConstBOnly": bool(weights_only)})
        tmp.replace(dst)
    finally:
        root.setLevel(level)
        tmp.unlink(missing_ok=True)
    return dst


def _position_table_products(path: Path) -> list[str]:
    """MatMuls whose constant operand is not a 2-D weight matrix: the relative-position tables
    of the fused-attention graphs ([rows, C, rows]). They are a negligible share of the time and
    quantising them only adds error to the attention scores, so they stay FP32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    rank = {t.name: len(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and rank.get(n.input[1], 2) != 2]


def _precisions_supported() -> bool:
    """True when this cellsam-rt's model directories may list an int8 precision."""
    from cellsam_rt import model_dir
    from cellsam_rt.backends import PRECISIONS as BACKEND_PRECISIONS
    return PRECISION in model_dir.PRECISIONS and PRECISION in BACKEND_PRECISIONS


def quantize_model_dir(model: "str | Path | ModelDir", graphs: Sequence[str] = DEFAULT_GRAPHS,
                       per_channel: bool = True, force: bool = False,
                       update_manifest: bool = True,
                       progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write `<graph>.int8.onnx` for the trunks and an "int8" precision entry in the manifest."""
    say = progress or (lambda _m: None)
    md = resolve_model(model)
    unknown = [g for g in graphs if g not in GRAPH_NAMES]
    if unknown or not graphs:
        raise QuantizeError(f"graphs must be among {', '.join(GRAPH_NAMES)}, got {list(graphs)}")
    if update_manifest and not _precisions_supported():
        raise QuantizeError("this cellsam-rt cannot load int8 model directories yet "
                            "(model_dir/backends lack the 'int8' precision)")
    if PRECISION in md.precisions and not force:
        raise QuantizeError(f"{md.path} already has int8 graphs (use --force to redo them)")
    entry, sources = {}, {}
    # CPU graphs that call cellsam-rt's kernels are quantised only where those kernels run:
    # else the INT8 graphs could not load here.
    from cellsam_rt import kernels as ops

    kernels_ok = not md.cpu_custom_ops or (not ops.missing(md.cpu_custom_ops) and ops.status()[0])
    if not kernels_ok:
        say(f"the CPU graphs call {', '.join(md.cpu_custom_ops)}, but {ops.status()[1]}: "
            "quantising the plain graphs")
    for graph in GRAPH_NAMES:
        if graph in graphs:
            dst = md.path / int8_file_name(graph)
            t0 = time.perf_counter()
            say(f"quantising {graph} ...")
            # INT8 runs on the CPU only, so it starts from the fused-attention CPU graph
            # where the directory has one (attention stays FP32 either way).
            src = ((md.cpu_graph_path(graph, "fp32") if kernels_ok else None)
                   or md.graph_path(graph, "fp32"))
            quantize_graph(src, dst, per_channel=per_channel)
            sources[graph] = src.name
            say(f"wrote {dst.name}: {dst.stat().st_size / 1e6:.1f} MB in "
                f"{time.perf_counter() - t0:.1f} s")
            entry[graph] = dst.name
        else:
            entry[graph] = md.manifest["graphs"]["fp32"][graph]  # stays FP32
    for graph in OPTIONAL_GRAPHS:  # the windowed decoder stays FP32 too
        if md.has_graph(graph, "fp32"):
            entry[graph] = md.manifest["graphs"]["fp32"][graph]
    if update_manifest:
        from importlib import metadata

        from cellsam_rt.io import atomic_write
        manifest = json.loads(json.dumps(dict(md.manifest)))
        manifest["graphs"][PRECISION] = entry
        try:
            ort_version = metadata.version("onnxruntime")
        except metadata.PackageNotFoundError:
            ort_version = None
        manifest["quantization"] = {
            "precision": PRECISION, "method": "onnxruntime dynamic (MatMul, const weights)",
            "weights": "int8 " + ("per output channel" if per_channel else "per tensor"),
            "activations": "uint8 per tensor, computed per call",
            "graphs": [g for g in GRAPH_NAMES if g in graphs], "sources": sources,
            "onnxruntime": ort_version}
        text = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
        atomic_write(md.manifest_path, lambda fh: fh.write(text))
        ModelDir.load(md.path)  # fail here, not at the next run, if the result is invalid
        say(f"manifest updated: precision {PRECISION} = {entry}")
    return entry

