"""Mask decoding alone, ours (one batched call) vs the reference (one call per box), interleaved.

    python benchmarks/decoder_vs_reference.py MODEL_DIR CHECKPOINT EMBEDDINGS.npy --boxes 32

Both sides decode the same boxes on the same embedding (ours, from the FP32 encoder graph) and
upsample to a 512x512 image as the pipeline would: ours decode_masks + paste_masks, the
reference decode_masks_per_box (decoder call, CPU upsampling, threshold per box). Rounds
alternate the order; thread counts are set for both sides (torch.set_num_threads, ORT
intra-op), so the effect of oversubscription on a loaded machine can be seen. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    """Time both decoders round-robin at each thread count."""
    import torch
    from cellsam_export.checkpoint import load_checkpoint
    from cellsam_export.reference import decode_masks_per_box

    import bench_cache
    from cellsam_rt.tools.bench import load_average, synthetic_cells
    from cellsam_rt.stages.detect import boxes_to_model_space
    from cellsam_rt.stages.masks import decode_masks, paste_masks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("embeddings", type=Path)
    p.add_argument("--boxes", type=int, default=32)
    p.add_argument("--threads", default="2,1")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)

    model, _ = load_checkpoint(args.checkpoint)
    model.eval()
    emb = np.load(args.embeddings).astype(np.float32)
    _img, boxes = synthetic_cells(512, args.boxes, seed=0)
    S = int(model.sam.image_encoder.img_size)
    boxes_s = boxes_to_model_space(boxes, (512, 512), S)
    out: dict = {"boxes": args.boxes, "load_average": [load_average()], "runs": []}
    for n in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(n)
        backend = bench_cache.cpu_backend(args.model_dir, n)
        backend.load(["decoder"])
        backend.run("decoder", {"embeddings": emb, "boxes": boxes_s[:1],
                                "box_image": np.zeros(1, np.int64)})  # warm-up

        def ours():
            labels = np.zeros((512, 512), np.int32)
            for kept, logits, _ in decode_masks(backend.run, emb, boxes_s,
                                                np.zeros(len(boxes_s), np.int64), 32, 0.5):
                paste_masks(labels, logits, (kept + 1).astype(np.int32), S)

        def reference():
            decode_masks_per_box(model, torch.from_numpy(emb), boxes_s, (512, 512))

        for r in range(args.rounds):
            for name, fn in ((("ours", ours), ("reference", reference)) if r % 2 == 0
                             else (("reference", reference), ("ours", ours))):
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                out["runs"].append({"threads": n, "side": name, "seconds": dt,
                                    "ms_per_box": 1000 * dt / args.boxes})
                print(f"threads {n} {name}: {dt:.2f} s", file=sys.stderr, flush=True)
        backend.close()
    out["load_average"].append(load_average())
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
