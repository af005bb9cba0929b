"""Mask decoding memory is bounded by the chunk size, not by the number of boxes.

Each measurement runs in a fresh subprocess: load the tiny model's decoder, warm it up with two
chunks, then decode N boxes (spread over 4 image embeddings) through `decode_masks` and report
how far the process's peak RSS rose above the warmed-up peak. The peak is VmHWM from
/proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking
parent across exec, so under a large pytest process it reads the parent's peak.

Measured on the shared 2-core dev machine (tiny model, 64x64 mask logits): at chunk 64, 100 boxes
+0.0 MB and 1000 boxes +0.0-0.1 MB; 1000 boxes in one decoder call (chunk 1000) +483.7 MB, for
contrast. The test allows 8 MB between 100 and 1000 boxes (allocator noise).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from cellsam_rt.backends import create_backend
    from cellsam_rt.stages.masks import decode_masks

    model_dir, n_boxes, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    backend = create_backend(model_dir, backend="cpu", precision="fp32", threads=1)
    rng = np.random.default_rng(0)

    def boxes(n, size):
        xy = rng.uniform(0, size * 0.8, (n, 2))
        wh = rng.uniform(size * 0.05, size * 0.2, (n, 2))
        return np.concatenate([xy, xy + wh], 1).astype(np.float32)

    import pathlib
    man = json.loads((pathlib.Path(model_dir) / "manifest.json").read_text())
    S = man["image_size"]
    c, h, w = man["embedding_shape"]
    emb = rng.standard_normal((4, c, h, w)).astype(np.float32)

    def run(n):
        kept = 0
        bi = rng.integers(0, 4, n).astype(np.int64)
        for idx, logits, iou in decode_masks(backend.run, emb, boxes(n, S), bi, chunk_size=chunk,
                                             iou_threshold=0.0):
            kept += len(idx)
        return kept

    def peak_kb():
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])

    run(min(chunk, 64) * 2)  # warm up: sessions, arenas, first chunk
    before = peak_kb()
    kept = run(n_boxes)
    after = peak_kb()
    print(json.dumps({"kept": kept, "before_kb": before, "after_kb": after}))
""")


def _peak_growth_mb(model_dir, n_boxes: int, chunk: int) -> float:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(model_dir), str(n_boxes), str(chunk)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["kept"] == n_boxes  # every box decoded (iou_threshold 0 keeps all)
    return (res["after_kb"] - res["before_kb"]) / 1024.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_decode_memory_is_bounded_by_chunk(tiny_model_dir):
    grow_100 = _peak_growth_mb(tiny_model_dir, 100, 64)
    grow_1000 = _peak_growth_mb(tiny_model_dir, 1000, 64)
    grow_1000_one_call = _peak_growth_mb(tiny_model_dir, 1000, 1000)
    print(f"peak RSS growth: 100 boxes {grow_100:.1f} MB, 1000 boxes {grow_1000:.1f} MB "
          f"(chunk 64); 1000 boxes in one call {grow_1000_one_call:.1f} MB")
    # Ten times the boxes, same chunk: the peak stays put (allow allocator noise).
    assert grow_1000 - grow_100 < 8.0
    # The bound is the chunking's doing: one 1000-box call needs far more.
    assert grow_1000_one_call > grow_1000 + 100.0
