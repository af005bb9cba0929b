"""`cellsam-rt evaluate`: segment an image (or read a prediction) and score it against truth."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from cellsam_rt.cli.options import add_model_options, add_segmenter_options, segmenter_kwargs
from cellsam_rt.tools.evaluate import _check_labels, evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt evaluate`."""
    parser.add_argument("--image", required=True, type=Path, help="the image to segment")
    parser.add_argument("--truth", required=True, type=Path,
                        help="ground-truth instance label image (same height and width)")
    parser.add_argument("--pred", type=Path, default=None, metavar="LABELS",
                        help="score this label image instead of running a model")
    parser.add_argument("--baseline", action="store_true",
                        help="also score the classical baseline (Otsu + distance-transform watershed)")
    add_model_options(parser)
    add_segmenter_options(parser)
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")


_COLUMNS = ("f1@0.5", "f1@0.75", "f1@0.9", "precision", "recall", "mean_iou", "n_pred", "n_true", "seconds")


def format_table(rows: Sequence[tuple[str, dict]]) -> str:
    """A fixed-width text table of evaluation rows (name, scores)."""
    head = f"{'method':<22}" + "".join(f"{c:>10}" for c in _COLUMNS)
    lines = [head]
    for name, r in rows:
        cells = []
        for c in _COLUMNS:
            v = r.get(c)
            cells.append(f"{'-':>10}" if v is None else
                         f"{v:>10d}" if isinstance(v, int) else f"{v:>10.3f}")
        lines.append(f"{name:<22}" + "".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run `cellsam-rt evaluate`: segment (or read) the prediction and print its scores."""
    from cellsam_rt.io import read_image

    image = read_image(args.image) if (args.pred is None or args.baseline) else None
    truth = _check_labels(read_image(args.truth), "truth")
    rows: list[tuple[str, dict]] = []
    if args.pred is not None:
        pred = read_image(args.pred)
        rows.append((args.pred.name, evaluate(pred, truth)))
    else:
        from cellsam_rt.pipeline.segmenter import Segmenter

        seg = Segmenter(**segmenter_kwargs(args))
        t0 = time.perf_counter()
        result = seg.segment(image, channels=args.channels)
        dt = time.perf_counter() - t0
        name = str(seg.model_dir.manifest.get("name", args.model)) if hasattr(seg.model_dir, "manifest") \
            else str(args.model)
        rows.append((name, {**evaluate(result.labels, truth), "seconds": dt}))
    if args.baseline:
        from cellsam_rt.tools.baseline import otsu_watershed

        t0 = time.perf_counter()
        base = otsu_watershed(image, channels=args.channels)
        rows.append(("otsu+watershed", {**evaluate(base, truth), "seconds": time.perf_counter() - t0}))
    if args.json:
        print(json.dumps([{"method": n, **r} for n, r in rows], indent=2))
    else:
        print(format_table(rows))
        if args.baseline:
            from cellsam_rt.tools.baseline import describe

            print(f"baseline: {describe()}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point (the same as `cellsam-rt evaluate`)."""
    p = argparse.ArgumentParser(prog="cellsam-rt evaluate", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
