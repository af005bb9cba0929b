"""`cellsam-rt track-score`: CTC tracking scores (TRA, DET, divisions) of a result folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .main import EXIT_OK, EXIT_USAGE, error
from .options import count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Score a tracking result against ground truth with the Cell Tracking "
                          "Challenge metrics (py-ctcmetrics): TRA, DET and division precision, "
                          "recall and F1.")
    parser.add_argument("result", metavar="RESULT", type=Path,
                        help="result folder (mask*.tif + res_track.txt, as `track` writes)")
    parser.add_argument("gt", metavar="GT", type=Path,
                        help="ground truth: a CTC folder with TRA/man_track*.tif and "
                             "TRA/man_track.txt, or the flat layout of RESULT")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the scores as JSON to FILE")
    parser.add_argument("--division-tolerance", type=count, default=0, metavar="N",
                        help="a division counts as found up to N frames early or late "
                             "(the CTC's BC(N); default 0)")


def format_table(scores: dict) -> str:
    rows = [("TRA", f"{scores['TRA']:.4f}"), ("DET", f"{scores['DET']:.4f}"),
            ("division precision", f"{scores['division_precision']:.3f}"),
            ("division recall", f"{scores['division_recall']:.3f}"),
            ("division F1", f"{scores['division_f1']:.3f}"),
            ("divisions (gt / found / matched)",
             f"{scores['divisions_gt']} / {scores['divisions_found']} / "
             f"{scores['divisions_matched']}"),
            ("frames", str(scores["frames"]))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from ..io import ImageReadError, atomic_write
    from ..workflows.track_metrics import ScoreError, score_tracking

    try:
        scores = score_tracking(args.result, args.gt, args.division_tolerance)
    except (ImageReadError, ScoreError) as exc:
        error(exc)
        return EXIT_USAGE
    print(format_table(scores))
    if args.json is not None:
        data = (json.dumps(scores, indent=2) + "\n").encode("utf-8")
        try:
            atomic_write(args.json, lambda fh: fh.write(data))
        except OSError as exc:
            error(f"{args.json}: cannot write ({exc.strerror or exc})")
            return EXIT_USAGE
    return EXIT_OK
