"""A model directory of small hand-built ONNX graphs with the real graph I/O names and shapes.

It needs only the `onnx` package (not torch), so backend and manifest tests run without the
exporter; the exporter's own tiny model is tested against the same code in test_backends.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

S, C, H = 64, 8, 4  # image size, embedding channels, embedding side (S / 16)
Q = 16  # queries: a 4x4 grid of 16-pixel cells


def _model(nodes, inputs, outputs, inits):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    return model


def _graphs(seed: int = 0):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    image = helper.make_tensor_value_info("image", f32, ["B", 3, S, S])

    enc = _model(
        [helper.make_node("Conv", ["image", "w"], ["embeddings"], strides=[16, 16],
                          kernel_shape=[16, 16])],
        [image], [helper.make_tensor_value_info("embeddings", f32, ["B", C, H, H])],
        [numpy_helper.from_array(rng.standard_normal((C, 3, 16, 16)).astype(np.float32) * 0.05, "w")])

    cf = _model(
        [helper.make_node("Conv", ["image", "w"], ["f"], strides=[16, 16], kernel_shape=[16, 16]),
         helper.make_node("Reshape", ["f", "shape"], ["r"]),
         helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
         helper.make_node("Split", ["t", "split"], ["class_logits", "raw"], axis=2),
         helper.make_node("Sigmoid", ["raw"], ["boxes"])],
        [image], [helper.make_tensor_value_info("class_logits", f32, ["B", Q, 2]),
                  helper.make_tensor_value_info("boxes", f32, ["B", Q, 4])],
        [numpy_helper.from_array(rng.standard_normal((6, 3, 16, 16)).astype(np.float32) * 0.05, "w"),
         numpy_helper.from_array(np.array([0, 6, Q], np.int64), "shape"),
         numpy_helper.from_array(np.array([2, 4], np.int64), "split")])

    dec = _model(
        [helper.make_node("Gather", ["embeddings", "box_image"], ["g"], axis=0),
         helper.make_node("ReduceMean", ["g", "ax1"], ["m"], keepdims=1),
         helper.make_node("Resize", ["m", "", "scales"], ["up"], mode="linear"),
         helper.make_node("ReduceMean", ["boxes", "ax1"], ["iou"], keepdims=1),
         helper.make_node("Reshape", ["iou", "shape4"], ["bias"]),
         helper.make_node("Add", ["up", "bias"], ["mask_logits"])],
        [helper.make_tensor_value_info("embeddings", f32, ["T", C, H, H]),
         helper.make_tensor_value_info("boxes", f32, ["N", 4]),
         helper.make_tensor_value_info("box_image", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("mask_logits", f32, ["N", 1, 4 * H, 4 * H]),
         helper.make_tensor_value_info("iou", f32, ["N", 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "ax1"),
         numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "scales"),
         numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4")])
    return {"encoder": enc, "cellfinder": cf, "decoder": dec}


def manifest(precisions=("fp32",)) -> dict:
    """A manifest for the synthetic graphs, in the exporter's format."""
    suffix = {"fp32": ".onnx", "fp16": ".fp16.onnx", "int8": ".int8.onnx"}
    return {
        "format_version": 1,
        "name": "synthetic",
        "description": "hand-built test graphs",
        "image_size": S,
        "embedding_shape": [C, H, H],
        "mask_size": 4 * H,
        "num_queries": Q,
        "num_classes": 2,
        "preprocessing": {"mode": "cellsam", "has_model_cp": False},
        "thresholds": {"bbox_threshold": 0.4, "iou_threshold": 0.5, "mask_threshold": 0.4,
                       "min_size": 25},
        "graphs": {p: {g: f"{g}{suffix[p]}" for g in ("encoder", "cellfinder", "decoder")}
                   for p in precisions},
        "opset": 18,
        "source": {"checkpoint": None, "sha256": None, "config": "synthetic"},
        "exporter": {"package": "tests"},
    }


def make_synthetic_model_dir(out: Path, precisions=("fp32",)) -> Path:
    """Write the synthetic graphs (the same FP32 graph under each precision's name) + manifest."""
    import onnx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = manifest(precisions)
    graphs = _graphs()
    for files in m["graphs"].values():
        for name, filename in files.items():
            onnx.save(graphs[name], str(out / filename))
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    return out


def graph_inputs(model_dir, graph: str, batch: int = 1, boxes: int = 3, seed: int = 0) -> dict:
    """Random inputs of the right shapes for one graph of a model directory."""
    from cellsam_rt.model_dir import ModelDir

    md = model_dir if isinstance(model_dir, ModelDir) else ModelDir.load(model_dir)
    rng = np.random.default_rng(seed)
    s = md.image_size
    c, h, w = md.embedding_shape
    if graph in ("encoder", "cellfinder"):
        return {"image": rng.standard_normal((batch, 3, s, s)).astype(np.float32)}
    xy = rng.uniform(0, s * 0.6, (boxes, 2)).astype(np.float32)
    wh = rng.uniform(4, s * 0.4, (boxes, 2)).astype(np.float32)
    return {"embeddings": rng.standard_normal((batch, c, h, w)).astype(np.float32),
            "boxes": np.concatenate([xy, xy + wh], axis=1),
            "box_image": (np.arange(boxes) % batch).astype(np.int64)}
