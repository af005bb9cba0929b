"""Trunk variants compared round-robin in one process, so background load hits them alike.

    python benchmarks/interleaved.py MODEL_DIR --graph encoder --rounds 2 \\
        --variants fp32,fp32-vitfused,fp32-1thread,fp16,int8,int8attn

On a shared machine, variants measured one after another (test_bench_trunks.py) can differ by
2x from load drift alone; here every round runs each variant once, in turn, and the ratios are
medians over rounds. All sessions share one ONNX Runtime memory arena (the backend's default),
so several full-size sessions hold only the largest one's peak. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    """Load every variant, run them round-robin, print medians and speed-ups vs the first."""
    from cellsam_rt.tools.bench import cpu_info, load_average, synthetic_cells
    from cellsam_rt.model_dir import ModelDir
    from cellsam_rt.stages.preprocess import preprocess
    from measure import trunk_backend

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--graph", default="encoder", choices=("encoder", "cellfinder"))
    p.add_argument("--variants", default="fp32,int8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    model = ModelDir.load(args.model_dir)
    image, _ = synthetic_cells(512, 32, seed=0)
    enc, fin, _ = preprocess(image, model.image_size, model.has_model_cp)
    feed = {"image": (enc if args.graph == "encoder" else fin)[None]}
    backends = {v: trunk_backend(args.model_dir, v, args.threads) for v in variants}
    for b in backends.values():
        b.load([args.graph])
    times: dict = {v: [] for v in variants}
    outputs: dict = {}
    load_start = load_average()
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # ABBA: no variant always first
        for v in order:
            t0 = time.perf_counter()
            outputs[v] = backends[v].run(args.graph, feed)
            times[v].append(time.perf_counter() - t0)
            print(f"round {r + 1} {v}: {times[v][-1]:.2f} s", file=sys.stderr, flush=True)
    base = variants[0]
    med = {v: float(np.median(t)) for v, t in times.items()}
    res = {"graph": args.graph, "rounds": args.rounds, "machine": cpu_info(),
           "load_average": [load_start, load_average()], "samples_s": times, "median_s": med,
           "speedup_vs_" + base: {v: med[base] / med[v] for v in variants}}
    ref = outputs[base]
    res["rel_l2_vs_" + base] = {
        v: {k: float(np.linalg.norm(outputs[v][k] - ref[k]) / np.linalg.norm(ref[k]))
            for k in ref} for v in variants[1:]}
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
