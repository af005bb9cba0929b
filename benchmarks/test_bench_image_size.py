"""Image-size scaling, 512^2 .. 4096^2, tiled: time and peak memory per size, one process each.

Runs on the *tiny* model whatever --bench-model says: at full size a 4096^2 image is ~120 tiles
of two ViT-B passes each (slow on a CPU). The tiny model keeps what grows with the
image besides the trunks: tiling, per-tile preprocessing, decoding one box per cell, ROI paste,
stitching, hole filling, the cell table, and the memory of the label images. The full-size
time is that plus tiles x the trunk time per tile and cells x the decoder time per box
(docs/performance.md). Cells sit 40 px apart, so the box count grows with the area.
"""
from __future__ import annotations

import pytest

import bench_cache
from conftest import record
from test_bench_decoder import run_measure

SIZES = {"full": (512, 1024, 2048, 4096), "tiny": (512, 1024)}
PITCH = 40


@pytest.fixture(scope="module")
def tiny_model() -> str:
    """The tiny model directory (cached)."""
    return str(bench_cache.model_dir("tiny"))


@pytest.mark.parametrize("size", SIZES["full"], ids=[f"{s}px" for s in SIZES["full"]])
def test_image_size(benchmark, size, bench_config, tiny_model, threads):
    """Tiled segmentation of one synthetic size x size image with one box per cell."""
    if size not in SIZES[bench_config]:
        pytest.skip(f"{size}px only in the full benchmark run")
    benchmark.group = "image-size-tiled"
    args = ["image", "--model", tiny_model, "--size", str(size), "--pitch", str(PITCH),
            "--tile", "always", "--threads", str(threads)]
    res = benchmark.pedantic(run_measure, args=tuple(args), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in res.items() if k != "runs"})
    record("image_size", f"{size}px", res)
