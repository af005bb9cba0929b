"""`cellsam-rt info`: describe a model directory and the installed inference software."""
from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path

from cellsam_rt import __version__
from cellsam_rt.cli.main import EXIT_OK, EXIT_USAGE, error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt info`."""
    parser.add_argument("model", nargs="?", default="default", metavar="MODEL",
                        help="model directory or 'default' (default)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON only")


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def run(args: argparse.Namespace) -> int:
    """Print the model's manifest summary, its graphs and the inference software found."""
    from cellsam_rt.model_dir import ModelDirError, resolve_model

    try:
        model = resolve_model(args.model)
    except ModelDirError as exc:
        if not args.json:
            _print_software()  # still useful when diagnosing an installation
        error(exc)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(dict(model.manifest), indent=2))
        return EXIT_OK
    m = model.manifest
    c, h, w = model.embedding_shape
    print(f"model        {model.name}  ({model.path})")
    if model.description:
        print(f"description  {model.description}")
    print(f"format       version {m['format_version']}, opset {m.get('opset', '?')}")
    print(f"input        3x{model.image_size}x{model.image_size}; embeddings {c}x{h}x{w}; "
          f"masks {model.mask_size}x{model.mask_size}"
          + (f"; {model.num_queries} queries" if model.num_queries else ""))
    print(f"preprocess   mode {model.preprocessing_mode}, has_model_cp {model.has_model_cp}")
    print("thresholds   " + ", ".join(f"{k} {v}" for k, v in model.thresholds.items()))
    src = m.get("source") or {}
    if src:
        print("source       " + ", ".join(f"{k} {v}" for k, v in src.items() if v is not None))
    exp = m.get("exporter") or {}
    if exp:
        print("exporter     " + ", ".join(f"{k} {v}" for k, v in exp.items()))
    print("graphs")
    for precision in model.precisions:
        for graph in ("encoder", "cellfinder", "decoder"):
            path = model.graph_path(graph, precision)
            print(f"  {precision}  {graph:<10}  {path.name:<24} {_size(path):>10}")
            cpu = model.cpu_graph_path(graph, precision)
            if cpu is not None:  # what the CPU backend runs instead (fused attention)
                print(f"  {precision}  {graph:<10}  {cpu.name:<24} {_size(cpu):>10}  (cpu backend)")
    if model.cpu_custom_ops:
        print("cpu kernels  " + ", ".join(model.cpu_custom_ops) + " (cellsam_rt.kernels)")
    _print_software()
    return EXIT_OK


def _print_software() -> None:
    """onnxruntime, its providers, and the GPU software present (if any)."""
    from cellsam_rt.backends.onnxruntime import available_providers, onnxruntime_package

    from cellsam_rt import kernels as ops

    print(f"runtime      cellsam-rt {__version__}, {onnxruntime_package()}")
    usable, why = ops.status()
    print(f"kernels      {why}" if usable else f"kernels      not used: {why}")
    try:
        from cellsam_rt.tools.sysinfo import format_gpu_software
    except ImportError:
        format_gpu_software = None
    if format_gpu_software is not None:  # the full probe: GPUs, driver, CUDA runtime
        print("gpu software")
        for line in format_gpu_software().splitlines():
            print(f"  {line}")
        return
    print(f"providers    {', '.join(available_providers())}")
    gpu = [v for v in (_dist_version("onnxruntime-gpu"),
                       _dist_version("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
                       _dist_version("cuda-python")) if v]
    print(f"gpu software {', '.join(gpu) if gpu else 'none found (CPU only)'}")


