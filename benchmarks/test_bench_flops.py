"""This CPU's SGEMM rate (the ceiling for the trunks' MatMuls) and the model's FLOPs per stage.

Peak: numpy float32 4096x4096 matmul, BLAS threads = usable cores, best of 10 after a warm-up,
in a fresh process (flops.peak_sgemm_gflops). FLOPs: counted from the exported ONNX graphs
(flops.model_flops). The summary divides them by the end-to-end stage medians of this run.
"""
from __future__ import annotations

from conftest import record


def test_sgemm_peak(benchmark, threads):
    """numpy float32 SGEMM GFLOP/s on every usable core."""
    from flops import peak_sgemm_gflops

    benchmark.group = "cpu-peak"
    res = benchmark.pedantic(peak_sgemm_gflops, kwargs={"threads": threads}, rounds=1,
                             iterations=1)
    benchmark.extra_info.update(res)
    record("flops", "sgemm", res)


def test_model_flops(benchmark, model_dir):
    """FLOPs per stage from the graphs (timed only because --benchmark-only needs a benchmark)."""
    from flops import model_flops

    benchmark.group = "flop-count"
    res = benchmark.pedantic(model_flops, args=(model_dir,), kwargs={"boxes": 4}, rounds=1,
                             iterations=1)
    benchmark.extra_info.update({k: v for k, v in res.items() if k != "detail"})
    record("flops", "model", res)
