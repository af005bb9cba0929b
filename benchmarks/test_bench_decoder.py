"""Mask decoder scaling, 1..1000 boxes, and its memory against the chunk size.

Each configuration runs in its own process (benchmarks/measure.py) so that its peak RSS is its
own: process peak (VmHWM) including Python, ONNX Runtime and the decoder session. Boxes lie on a
regular grid over the 1024x1024 model frame; all masks are kept (IoU filter off). The paste is
left out: with random weights masks cover the frame, so it would time an untypical worst case
(test_bench_post_decoder.py times the paste on cell-shaped masks). The pytest-benchmark time
includes process start and session load; the decoder's own time is in extra_info and the
summary.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench_cache
from conftest import record

HERE = Path(__file__).resolve().parent
# (boxes, chunk): scaling 1..1000 boxes at the CPU default chunk (4), then memory/time vs chunk
# at 128 boxes (peak memory follows the chunk, not the box count).
CONFIGS = [(1, 4), (10, 4), (128, 4), (1000, 4), (128, 1), (128, 16), (128, 32), (128, 64)]


def run_measure(*args: str) -> dict:
    """Run measure.py in a fresh interpreter and return its JSON record."""
    out = subprocess.run([sys.executable, str(HERE / "measure.py"), *args],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measure.py {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def embeddings(model_dir) -> Path:
    """The encoder embedding of the shared 512x512 image (computed once, cached)."""
    return bench_cache.embeddings_file(model_dir)


@pytest.mark.parametrize("boxes,chunk", CONFIGS, ids=[f"{b}boxes-chunk{c}" for b, c in CONFIGS])
def test_decoder_scaling(benchmark, boxes, chunk, model_dir, embeddings, threads):
    """Decoder time and process peak memory for one (boxes, chunk) configuration."""
    benchmark.group = "decoder-scaling"
    args = ["decoder", "--model", str(model_dir), "--embeddings", str(embeddings),
            "--boxes", str(boxes), "--chunk", str(chunk), "--threads", str(threads)]
    res = benchmark.pedantic(run_measure, args=tuple(args), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    record("decoder_scaling", f"{boxes}boxes/chunk{chunk}", res)
