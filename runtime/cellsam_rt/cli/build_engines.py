"""`cellsam-rt build-engines`: build TensorRT engines for a model on this machine's GPU."""
from __future__ import annotations

import argparse

from cellsam_rt.backends.tensorrt.build import build_engines
from cellsam_rt.backends.tensorrt.engines import (DEFAULT_MAX_BATCH, DEFAULT_MAX_BOXES,
                                                  DEFAULT_OPT_BATCH, DEFAULT_OPT_BOXES,
                                                  DEFAULT_WORKSPACE_GB, ENGINE_DIR_ENV, PRECISIONS,
                                                  TYPINGS)
from cellsam_rt.config import GRAPH_NAMES


# ---------------------------------------------------------------- `cellsam-rt build-engines`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cellsam-rt build-engines`."""
    parser.add_argument("model", nargs="?", default="default",
                        help="model directory (default: the shipped model)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="largest image/tile batch the engines accept (default %(default)s)")
    parser.add_argument("--max-boxes", type=int, default=DEFAULT_MAX_BOXES,
                        help="most boxes per decoder call; more are run in chunks "
                             "(default %(default)s)")
    parser.add_argument("--opt-batch", type=int, default=None,
                        help=f"batch the kernels are tuned for (default min(max-batch, {DEFAULT_OPT_BATCH}))")
    parser.add_argument("--opt-boxes", type=int, default=None,
                        help=f"box count the decoder is tuned for (default {DEFAULT_OPT_BOXES})")
    parser.add_argument("--workspace-gb", type=float, default=DEFAULT_WORKSPACE_GB,
                        help="TensorRT builder workspace limit in GiB (default %(default)s)")
    parser.add_argument("--graphs", nargs="+", choices=GRAPH_NAMES, default=list(GRAPH_NAMES))
    parser.add_argument("--engine-dir", default=None,
                        help="write engines here instead of beside the manifest (for read-only "
                             f"model directories; `run` finds them via ${ENGINE_DIR_ENV})")
    parser.add_argument("--timing-cache", default=None,
                        help="timing cache file (default: beside the engines)")
    parser.add_argument("--no-timing-cache", action="store_true")
    parser.add_argument("--typing", choices=TYPINGS, default="auto",
                        help="weak: FP16 flag + FP32 constraints (TensorRT 10); strong: build the "
                             "mixed-precision *.fp16.onnx as typed (TensorRT 11+); auto picks")
    parser.add_argument("--opt-level", type=int, choices=range(6), default=None,
                        help="TensorRT builder optimisation level 0-5 (default TensorRT's, 3); "
                             "lower builds faster, higher searches more kernels")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    parser.add_argument("--verbose", action="store_true", help="print TensorRT's build log")


def run(args: argparse.Namespace) -> int:
    """Entry point of `cellsam-rt build-engines`: build, print where the engines went."""
    cache = False if args.no_timing_cache else args.timing_cache
    built = build_engines(args.model, args.precision, args.max_batch, args.max_boxes,
                          args.workspace_gb, cache, args.graphs, args.engine_dir, args.typing,
                          args.opt_batch, args.opt_boxes, args.device, args.verbose,
                          opt_level=args.opt_level)
    for graph, path in built.items():
        print(f"{graph}: {path}")
    return 0


