"""`cellsam-rt quantize`: add INT8 trunks to a model directory."""
from __future__ import annotations

import argparse
import sys

from cellsam_rt.tools.quantize import DEFAULT_GRAPHS, QuantizeError, quantize_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt quantize`."""
    parser.add_argument("model", metavar="MODEL", help="model directory to add int8 graphs to")
    parser.add_argument("--graphs", default=",".join(DEFAULT_GRAPHS), metavar="G[,G]",
                        help="graphs to quantise (default encoder,cellfinder; the decoder "
                             "stays FP32 unless named)")
    parser.add_argument("--per-tensor", action="store_true",
                        help="one weight scale per matrix instead of per output channel (the "
                             "default; same speed, more error)")
    parser.add_argument("--force", action="store_true", help="replace existing int8 graphs")


def run(args: argparse.Namespace) -> int:
    """Quantise a model directory's trunks; run with --precision int8 afterwards."""
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    try:
        quantize_model_dir(args.model, graphs=graphs, per_channel=not args.per_tensor,
                           force=args.force, progress=print)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done: segment with `cellsam-rt run --model {args.model} --precision int8 ...`")
    return 0
