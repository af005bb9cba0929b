"""Where a graph's time goes: ONNX Runtime's profiler, aggregated per operator type.

    python benchmarks/profile_ops.py MODEL_DIR --graph encoder --precision int8 [--json out.json]

One warm-up run, then one profiled run of the graph on the benchmarks' synthetic 512x512 image
(int8 uses the cached INT8 graphs from bench_cache.py). Prints ms and share per op type.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def profile_graph(model_dir: Path, graph: str, precision: str = "fp32", threads=None) -> dict:
    """Per-op-type time (ms) of one run of `graph`, from onnxruntime's profiler."""
    import onnxruntime as ort

    import bench_cache
    from cellsam_rt.tools.bench import synthetic_cells
    from cellsam_rt.model_dir import ModelDir
    from cellsam_rt.stages.preprocess import preprocess

    model = ModelDir.load(model_dir)
    if precision == "int8":
        model = bench_cache.variant_model(model_dir, "int8", bench_cache.int8_graphs(model_dir))
    image, _ = synthetic_cells(512, 32, seed=0)
    enc, fin, _ = preprocess(image, model.image_size, model.has_model_cp)
    x = (enc if graph == "encoder" else fin)[None]
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.log_severity_level = 3
        if model.cpu_custom_ops:  # INT8 graphs quantised from the kernel-calling CPU graphs
            from cellsam_rt import kernels as ops

            ops.register(opts)
        sess = ort.InferenceSession(str(model.graph_path(graph, precision)), opts,
                                    providers=["CPUExecutionProvider"])
        sess.run(None, {"image": x})  # warm-up, unprofiled
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(model.graph_path(graph, precision)), opts,
                                    providers=["CPUExecutionProvider"])
        sess.run(None, {"image": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict = defaultdict(float)
    total = 0.0
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            per_op[ev["args"]["op_name"]] += ev["dur"] / 1000.0
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            total = ev["dur"] / 1000.0
    ops = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
    return {"graph": graph, "precision": precision, "run_ms": total,
            "kernel_ms": sum(ops.values()), "per_op_ms": ops}


def main(argv=None) -> int:
    """Profile one graph and print the per-op breakdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--graph", default="encoder", choices=("encoder", "cellfinder"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    res = profile_graph(args.model_dir, args.graph, args.precision, args.threads)
    print(f"{args.graph} {args.precision}: run {res['run_ms']:.0f} ms, kernels "
          f"{res['kernel_ms']:.0f} ms")
    for op, ms in res["per_op_ms"].items():
        print(f"  {op:<28} {ms:>10.1f} ms {100 * ms / res['kernel_ms']:>6.1f}%")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
