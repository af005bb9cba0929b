#!/usr/bin/env python3
"""Images/s one by one versus pipelined (cellsam_rt.pipeline.runner), on any backend.

    python benchmarks/pipelined_throughput.py --model DIR --images 16 --size 1024 --json out.json

Images are written to disk first, so every run pays for reading as the CLI does. Two workloads:
- `stages`: read + preprocess (prepare) -> encoder, CellFinder, detection, decoder (infer);
- `segmenter`: `Segmenter.segment` on each image vs `runner.segment_many` (reading and, when the
  Segmenter offers `prepare`, preprocessing on worker threads).
Sequential and pipelined runs alternate (`--rounds`) so that load drift on a shared machine
hits both alike; the median of the rounds is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


import numpy as np  # noqa: E402


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    """n synthetic uint16 TIFFs of size x size with bright round cells."""
    import tifffile

    from gpu_check import synthetic_image  # same generator as the GPU check

    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.tif"
        tifffile.imwrite(p, synthetic_image(size, seed=i))
        paths.append(p)
    return paths


def stage_functions(model, backend):
    """prepare/infer for the model-stage workload."""
    from cellsam_rt.stages.detect import decode_detections
    from cellsam_rt.io import read_image
    from cellsam_rt.stages.preprocess import preprocess

    S = model.image_size

    def prepare(path):
        enc, fin, _ = preprocess(read_image(path), S, model.has_model_cp)
        return enc[None], fin[None]

    def infer(p):
        emb = backend.run("encoder", {"image": p[0]})["embeddings"]
        out = backend.run("cellfinder", {"image": p[1]})
        det = decode_detections(out["class_logits"][0], out["boxes"][0], S)
        boxes = det.boxes[:64].astype(np.float32)  # a bounded prompt load per image
        if len(boxes):
            backend.run("decoder", {"embeddings": emb, "boxes": boxes,
                                    "box_image": np.zeros(len(boxes), np.int64)})
        return len(det)

    return prepare, infer


def _stage_stats(stats) -> dict:
    """Per-item stage times (as measured inside the pipelined run) and the queue bound reached."""
    n = max(stats.items, 1)
    return {"max_in_flight": stats.max_in_flight,
            "prepare_s_per_item": round(stats.stage_seconds["prepare"] / n, 4),
            "infer_s_per_item": round(stats.stage_seconds["infer"] / n, 4)}


def measure(run_seq, run_pip, n: int, rounds: int) -> dict:
    seq, pip = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run_seq()
        seq.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        stats = run_pip()
        pip.append(n / (time.perf_counter() - t0))
    s, p = statistics.median(seq), statistics.median(pip)
    return {"sequential_images_per_s": round(s, 3), "pipelined_images_per_s": round(p, 3),
            "speedup": round(p / s, 3), "rounds_sequential": [round(x, 3) for x in seq],
            "rounds_pipelined": [round(x, 3) for x in pip], **stats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: export the tiny random model)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=["stages", "segmenter"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    from cellsam_rt.backends import create_backend
    from cellsam_rt.model_dir import ModelDir
    from cellsam_rt.pipeline.runner import PipelinedRunner, run_sequential, segment_many

    tmp = Path(tempfile.mkdtemp(prefix="cellsam-pipe-"))
    if args.model:
        model = ModelDir.load(args.model)
    else:
        from cellsam_export.testing import make_model_dir

        model = ModelDir.load(make_model_dir(tmp / "model", config="tiny"))
    paths = write_images(tmp, args.images, args.size)
    backend = create_backend(model, backend=args.backend, precision=args.precision,
                             threads=args.threads)
    results = {"model": model.name, "image_size_model": model.image_size,
               "image_side": args.size, "images": args.images, "backend": backend.describe(),
               "threads": args.threads, "workers": args.workers, "cpus": os.cpu_count()}
    print(json.dumps(results), flush=True)

    if "stages" in args.workloads:
        prepare, infer = stage_functions(model, backend)
        for p in paths[:2]:
            infer(prepare(p))  # warm-up: sessions, first-run allocations

        def pip():
            runner = PipelinedRunner(prepare, infer, workers=args.workers, depth=args.depth)
            assert all(r.ok for r in runner.run(paths))
            return _stage_stats(runner.stats)

        results["stages"] = measure(lambda: list(run_sequential(prepare, infer, None, paths)),
                                    pip, len(paths), args.rounds)
        print("stages", json.dumps(results["stages"]), flush=True)

    if "segmenter" in args.workloads:
        try:
            from cellsam_rt.io import read_image
            from cellsam_rt.pipeline.segmenter import Segmenter
        except ImportError as exc:
            results["segmenter"] = {"error": f"pipeline not importable: {exc}"}
        else:
            seg = Segmenter(model, backend=backend, tile="never")
            seg.segment(read_image(paths[0]))

            def pip():
                runners: list = []
                out = list(segment_many(seg, paths, workers=args.workers, depth=args.depth,
                                        runner_out=runners))
                assert all(r.ok for r in out), [r.error for r in out if not r.ok]
                return _stage_stats(runners[0].stats)

            results["segmenter"] = measure(
                lambda: [seg.segment(read_image(p)) for p in paths], pip, len(paths), args.rounds)
            results["segmenter"]["preprocessing_on_workers"] = callable(getattr(seg, "prepare", None))
            print("segmenter", json.dumps(results["segmenter"]), flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
