"""FLOPs of the exported graphs (counted from the ONNX graph) and this CPU's measured SGEMM peak.

FLOPs are 2 x multiply-accumulates of MatMul, Gemm, Conv, ConvTranspose and Einsum nodes, with
the shapes from ONNX shape inference at fixed input sizes; element-wise work (softmax, norms,
GELU) is left out, as FLOP counts for ViTs usually do. Run as a script for a summary:

    python benchmarks/flops.py MODEL_DIR [--boxes N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

COUNTED = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")


def _shapes(model) -> dict:
    shapes = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _einsum_flops(equation: str, shapes: list) -> int:
    """2 x the product of every index size of an einsum (its MAC count)."""
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict = {}
    for term, shape in zip(lhs, shapes):
        for letter, dim in zip(term, shape):
            sizes[letter] = dim
    return 2 * int(np.prod(list(sizes.values()), dtype=np.int64))


def node_flops(node, shapes: dict) -> int:
    """FLOPs of one node (0 for nodes not counted); raises if a needed shape is unknown."""
    def shape(name):
        s = shapes.get(name)
        if s is None or any(d is None for d in s):
            raise ValueError(f"{node.op_type} {node.name}: unknown shape of {name}")
        return s

    op = node.op_type
    if op == "MatMul":
        a, b = shape(node.input[0]), shape(node.input[1])
        out = shape(node.output[0])
        k = a[-1]
        return 2 * int(np.prod(out, dtype=np.int64)) * k
    if op == "Gemm":
        out = shape(node.output[0])
        a = shape(node.input[0])
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return 2 * int(np.prod(out, dtype=np.int64)) * k
    if op == "Conv":
        w, out = shape(node.input[1]), shape(node.output[0])
        return 2 * int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    if op == "ConvTranspose":
        x, w = shape(node.input[0]), shape(node.input[1])
        return 2 * int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    if op == "Einsum":
        eq = next(at.s.decode() for at in node.attribute if at.name == "equation")
        return _einsum_flops(eq, [shape(i) for i in node.input])
    return 0


def graph_flops(path: "str | Path", dims: dict) -> dict:
    """FLOPs per op type of an ONNX graph with its symbolic input dims fixed (e.g. {"B": 1})."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for inp in model.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])
    del model.graph.value_info[:]  # stale symbolic shapes from the exporter
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shapes(model)
    per_op: Counter = Counter()
    for node in model.graph.node:
        if node.op_type in COUNTED:
            per_op[node.op_type] += node_flops(node, shapes)
    out = dict(per_op)
    out["total"] = int(sum(per_op.values()))
    return out


def model_flops(model_dir: "str | Path", boxes: int = 1) -> dict:
    """GFLOP of encoder and CellFinder (one image) and of the decoder (per box, from `boxes`)."""
    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    g = manifest["graphs"]["fp32"]
    enc = graph_flops(model_dir / g["encoder"], {"B": 1})
    cf = graph_flops(model_dir / g["cellfinder"], {"B": 1})
    dec = graph_flops(model_dir / g["decoder"], {"T": 1, "N": boxes})
    return {"encoder_gflop": enc["total"] / 1e9, "cellfinder_gflop": cf["total"] / 1e9,
            "decoder_gflop_per_box": dec["total"] / boxes / 1e9,
            "detail": {"encoder": enc, "cellfinder": cf, "decoder": dec, "decoder_boxes": boxes}}


_SGEMM = r"""
import sys, time, json, numpy as np
n, reps = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.random((n, n), dtype=np.float32); b = rng.random((n, n), dtype=np.float32)
c = a @ b  # warm-up: thread pool start, page faults
best, times = 0.0, []
for _ in range(reps):
    t0 = time.perf_counter(); np.matmul(a, b, out=c); dt = time.perf_counter() - t0
    times.append(dt)
print(json.dumps({"n": n, "seconds": times}))
"""


def peak_sgemm_gflops(threads: int | None = None, n: int = 4096, repeats: int = 10) -> dict:
    """numpy float32 n x n matmul GFLOP/s on `threads` BLAS threads (best, median of repeats)."""
    threads = threads or len(os.sched_getaffinity(0))
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    # A fresh process: the BLAS thread count is fixed when numpy loads it.
    out = subprocess.run([sys.executable, "-c", _SGEMM, str(n), str(repeats)], env=env,
                         capture_output=True, text=True, check=True)
    times = json.loads(out.stdout)["seconds"]
    flop = 2.0 * n ** 3
    return {"n": n, "threads": threads, "repeats": repeats,
            "best_gflops": flop / min(times) / 1e9,
            "median_gflops": flop / float(np.median(times)) / 1e9,
            "method": f"numpy.matmul float32 {n}x{n} @ {n}x{n} (2n^3 FLOP), {threads} BLAS "
                      f"threads, {repeats} timed calls after one warm-up; best and median"}


def main(argv=None) -> int:
    """Print the model's FLOPs per stage and this CPU's SGEMM rate as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--boxes", type=int, default=4)
    p.add_argument("--no-peak", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = model_flops(args.model_dir, args.boxes)
    out["count_seconds"] = round(time.perf_counter() - t0, 1)
    if not args.no_peak:
        out["sgemm"] = peak_sgemm_gflops()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
