"""FP16 versions of the exported graphs, with the numerically fragile parts kept in FP32.

All-FP16 SAM overflows in its normalisations (docs/design.md §4), so these stay FP32:
- LayerNormalization, GroupNormalization, InstanceNormalization and Softmax nodes;
- every node of a module whose class is a LayerNorm/GroupNorm (the exporter records the module
  hierarchy in node metadata), which catches SAM's hand-written LayerNorm2d in the neck and the
  mask decoder's upscaling (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add);
- the same ReduceMean->Sub->Pow->ReduceMean->Add->Sqrt->Div chain found structurally, for graphs
  that carry no metadata;
- sinusoidal position encodings (Sin/Cos and the small coordinate arithmetic feeding them):
  their arguments reach tens of radians, where FP16 spacing would shift the phase visibly.
Graph inputs and outputs stay float32, so the runtime feeds both precisions the same arrays.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Union

import onnx

__all__ = ["convert_to_fp16", "fp32_node_names", "FP32_OP_TYPES"]

FP32_OP_TYPES = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax")
_NORM_MODULE_MARKERS = ("LayerNorm", "GroupNorm")  # matches LayerNorm2d too
_HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"
# Upstream walks from Sin/Cos stop at these: they mark where feature maps, not coordinates, flow.
_HEAVY_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "LayerNormalization", "Softmax"}


def _module_classes(node: onnx.NodeProto) -> list[str]:
    """The module class names a node was exported from (innermost last), from its metadata."""
    for prop in node.metadata_props:
        if prop.key == _HIERARCHY_KEY:
            try:
                import ast

                return [str(c) for c in ast.literal_eval(prop.value)]
            except (ValueError, SyntaxError):
                return []
    return []


def _in_norm_module(node: onnx.NodeProto) -> bool:
    """True if the node was exported from inside a LayerNorm/GroupNorm-like module."""
    classes = _module_classes(node)[:-1]  # the last entry is the aten op itself
    return any(any(m in c.rsplit(".", 1)[-1] for m in _NORM_MODULE_MARKERS) for c in classes)


def _layernorm_chains(nodes: list[onnx.NodeProto]) -> set[str]:
    """Names of nodes forming manual LayerNorm chains (mean, centre, variance, sqrt, divide)."""
    producer = {out: n for n in nodes for out in n.output}
    found: set[str] = set()
    for div in nodes:
        if div.op_type != "Div" or len(div.input) < 2:
            continue
        sqrt = producer.get(div.input[1])
        if sqrt is None or sqrt.op_type != "Sqrt":
            continue
        add = producer.get(sqrt.input[0])
        if add is None or add.op_type != "Add":
            continue
        var = next((producer[i] for i in add.input if i in producer and producer[i].op_type == "ReduceMean"), None)
        if var is None:
            continue
        pow_ = producer.get(var.input[0])
        if pow_ is None or pow_.op_type != "Pow":
            continue
        sub = producer.get(pow_.input[0])
        if sub is None or sub.op_type != "Sub":
            continue
        chain = [div, sqrt, add, var, pow_, sub]
        mean = producer.get(sub.input[1])
        if mean is not None and mean.op_type == "ReduceMean":
            chain.append(mean)
        numerator = producer.get(div.input[0])
        if numerator is not None and numerator.op_type == "Sub":
            chain.append(numerator)
        found.update(n.name for n in chain)
    return found


def _position_encoding_nodes(nodes: list[onnx.NodeProto]) -> set[str]:
    """Sin/Cos nodes and the light coordinate arithmetic upstream of them."""
    producer = {out: n for n in nodes for out in n.output}
    found: set[str] = set()
    stack = [n for n in nodes if n.op_type in ("Sin", "Cos")]
    while stack:
        node = stack.pop()
        if node.name in found:
            continue
        found.add(node.name)
        for name in node.input:
            parent = producer.get(name)
            # The MatMul by the Gaussian frequency matrix feeds Sin/Cos directly and must stay
            # FP32; heavier feature-map ops further up are not part of the encoding.
            if parent is None or parent.name in found:
                continue
            if parent.op_type in _HEAVY_OPS and not _is_small_matmul(parent, node):
                continue
            stack.append(parent)
    return found


def _is_small_matmul(parent: onnx.NodeProto, child: onnx.NodeProto) -> bool:
    """A MatMul directly (or via one Mul) feeding Sin/Cos: the position-frequency projection."""
    return parent.op_type == "MatMul" and child.op_type in ("Sin", "Cos", "Mul")


def fp32_node_names(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes convert_to_fp16 keeps in FP32 (besides FP32_OP_TYPES)."""
    nodes = list(model.graph.node)
    keep = {n.name for n in nodes if _in_norm_module(n)}
    keep |= _layernorm_chains(nodes)
    keep |= _position_encoding_nodes(nodes)
    return keep


def _ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every node a unique name, since the block list refers to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_fp16auto_{i}"
        seen.add(node.name)


def _restore_float32_outputs(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """Make float32 graph outputs float32 again where the converter left them float16.

    onnxconverter-common appends a Cast-to-float16 after a blocked (FP32) node that produces a
    graph output, even with keep_io_types; turning that Cast into a Cast-to-float32 keeps the
    FP32 result intact instead of rounding it through FP16.
    """
    from onnx import TensorProto, helper

    wanted = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    producer = {out: n for n in converted.graph.node for out in n.output}
    for out in converted.graph.output:
        if wanted.get(out.name) != TensorProto.FLOAT or out.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        node = producer.get(out.name)
        if node is not None and node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = TensorProto.FLOAT
        else:
            fp16_name = f"{out.name}_fp16"
            for n in converted.graph.node:
                n.output[:] = [fp16_name if o == out.name else o for o in n.output]
                n.input[:] = [fp16_name if i == out.name else i for i in n.input]
            converted.graph.node.append(
                helper.make_node("Cast", [fp16_name], [out.name], to=TensorProto.FLOAT, name=f"{out.name}_to_float32")
            )
        out.type.tensor_type.elem_type = TensorProto.FLOAT


def _cast_to(node: onnx.NodeProto) -> int | None:
    """The target dtype of a Cast node (None for other nodes)."""
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _remove_fp32_round_trips(
    converted: onnx.ModelProto, original: onnx.ModelProto, fp32_nodes: set[str], fp32_ops: set[str]
) -> None:
    """Let FP32 nodes pass FP32 values to each other, and read their weights at full precision.

    onnxconverter-common wraps every blocked node on its own: its outputs are cast to FP16 and
    the next blocked node casts them back, and the weights it reads are stored as FP16 and cast
    up. Inside a manual LayerNorm that rounds (x-u)^2 to FP16 (it overflows past |x-u| = 256)
    and in a position encoding it rounds the phase, undoing the point of keeping them in FP32.
    Here Cast(FP32 -> FP16 -> FP32) pairs are bypassed, and FP16 weights that feed a
    Cast-to-FP32 are replaced by FP32 copies of the original values.
    """
    from onnx import TensorProto

    graph = converted.graph
    producer = {out: n for n in graph.node for out in n.output}
    float_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    inits = {i.name: i for i in graph.initializer}
    original_inits = {i.name: i for i in original.graph.initializer}
    protected = {o.name for o in graph.output}

    def is_fp32(name: str) -> bool:
        node = producer.get(name)
        if node is None:
            return name in float_inputs
        return node.name in fp32_nodes or node.op_type in fp32_ops or _cast_to(node) == TensorProto.FLOAT

    rename: dict[str, str] = {}
    new_inits: dict[str, onnx.TensorProto] = {}
    for node in graph.node:
        if _cast_to(node) != TensorProto.FLOAT or node.output[0] in protected:
            continue
        src = node.input[0]
        first = producer.get(src)
        if first is not None and _cast_to(first) == TensorProto.FLOAT16 and is_fp32(first.input[0]):
            rename[node.output[0]] = first.input[0]
        elif (src in inits and inits[src].data_type == TensorProto.FLOAT16
              and src in original_inits and original_inits[src].data_type == TensorProto.FLOAT):
            name = f"{src}__fp32"
            if name not in new_inits:
                copy = onnx.TensorProto()
                copy.CopyFrom(original_inits[src])
                copy.name = name
                new_inits[name] = copy
            rename[node.output[0]] = name
    if not rename:
        return
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    graph.initializer.extend(new_inits.values())
    _prune_dead(converted)


def _prune_dead(model: onnx.ModelProto) -> None:
    """Remove nodes and initializers whose results nothing uses any more."""
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    names = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer} | {
        i.name for i in graph.input}
    keep_vi = [v for v in graph.value_info if v.name in names]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)


def convert_to_fp16(
    src: Union[str, Path],
    dst: Union[str, Path],
    extra_fp32_ops: Iterable[str] = (),
) -> Path:
    """Write an FP16 copy of an FP32 ONNX graph with float32 I/O and fragile ops kept in FP32."""
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    _ensure_node_names(model)
    op_block = list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OP_TYPES) + list(extra_fp32_ops)
    node_block = sorted(fp32_node_names(model))
    with warnings.catch_warnings():
        # One warning per tiny weight clamped to fp16's range: noise, not news.
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=op_block,
            node_block_list=node_block,
            # Weights beyond fp16's range are clamped by the converter rather than becoming inf.
            min_positive_val=1e-7,
            max_finite_val=1e4,
        )
    _restore_float32_outputs(model, converted)
    _remove_fp32_round_trips(converted, model, set(node_block), set(op_block))
    dst = Path(dst)
    onnx.save_model(converted, str(dst), save_as_external_data=False)
    return dst
