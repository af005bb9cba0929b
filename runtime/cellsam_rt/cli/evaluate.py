"""`cellsam-rt evaluate`: segment an image (or a folder of images) and score it against truth.

One image: `--image FILE --truth FILE` (or `--pred LABELS` to score a label file). A folder:
`--images DIR --truth DIR` (truth files named like the images) gives one row per image and
method and a mean row per method; `--csv FILE` writes the rows, `--json` prints them."""
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
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="the image to segment")
    src.add_argument("--images", type=Path, metavar="DIR",
                     help="a folder of images to segment (each scored against the truth file of "
                          "the same name in the --truth folder)")
    parser.add_argument("--truth", required=True, type=Path,
                        help="ground-truth instance label image (same height and width); with "
                             "--images, the folder of truth label images")
    parser.add_argument("--pred", type=Path, default=None, metavar="LABELS",
                        help="score this label image instead of running a model (with --image)")
    parser.add_argument("--baseline", action="store_true",
                        help="also score the classical baseline (Otsu + distance-transform watershed)")
    parser.add_argument("--truth-boxes", action="store_true",
                        help="also prompt the model with the truth's boxes: scores the masks "
                             "apart from detection (mean matched IoU)")
    add_model_options(parser)
    add_segmenter_options(parser)
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    parser.add_argument("--csv", type=Path, default=None, metavar="FILE",
                        help="also write the score rows to this CSV file")


_CELL = 11  # the longest column name, "area_ratio", plus a space

_COLUMNS = ("f1@0.5", "f1@0.75", "f1@0.9", "precision", "recall", "mean_iou", "area_ratio", "n_pred",
            "n_true", "seconds")


def format_table(rows: Sequence[tuple[str, dict]]) -> str:
    """A fixed-width text table of evaluation rows (name, scores)."""
    width = max([22] + [len(name) + 2 for name, _ in rows])
    head = f"{'method':<{width}}" + "".join(f"{c:>{_CELL}}" for c in _COLUMNS)
    lines = [head]
    for name, r in rows:
        cells = []
        for c in _COLUMNS:
            v = r.get(c)
            cells.append(f"{'-':>{_CELL}}" if v is None else
                         f"{v:>{_CELL}d}" if isinstance(v, int) else f"{v:>{_CELL}.3f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


_FOLDER_COLUMNS = ("f1@0.5", "mean_iou", "area_ratio", "precision", "recall", "n_pred", "n_true",
                   "seconds")


def format_folder_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of per-image rows (image, method, scores) and mean rows."""
    w_img = max([len("image")] + [len(str(r["image"])) for r in rows])
    w_m = max([len("method")] + [len(str(r["method"])) for r in rows])
    lines = [f"{'image':<{w_img}}  {'method':<{w_m}}" + "".join(f"{c:>{_CELL}}" for c in _FOLDER_COLUMNS)]
    for r in rows:
        cells = []
        for c in _FOLDER_COLUMNS:
            v = r.get(c)
            cells.append(f"{'-':>{_CELL}}" if v is None else
                         f"{v:>{_CELL}d}" if isinstance(v, int) else f"{v:>{_CELL}.3f}")
        lines.append(f"{str(r['image']):<{w_img}}  {str(r['method']):<{w_m}}" + "".join(cells))
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    import csv

    from cellsam_rt.errors import OutputDirError

    keys = list(dict.fromkeys(k for r in rows for k in r))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    except OSError as exc:
        raise OutputDirError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def _run_folder(args: argparse.Namespace) -> int:
    from cellsam_rt.tools.evaluate import mean_rows, pair_folder, score_images

    pairs = pair_folder(args.images, args.truth)
    from cellsam_rt.pipeline.segmenter import Segmenter

    seg = Segmenter(**segmenter_kwargs(args))

    def progress(r: dict) -> None:
        if not args.json:
            print(f"{r['image']}  {r['method']}: F1@0.5 {r['f1@0.5']:.3f}, mean IoU "
                  f"{r['mean_iou']:.3f}", file=sys.stderr, flush=True)

    rows = score_images(pairs, seg, baseline=args.baseline, with_truth_boxes=args.truth_boxes,
                        channels=args.channels, progress=progress)
    rows = rows + mean_rows(rows)
    if args.csv is not None:
        _write_csv(args.csv, rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_folder_table(rows))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run `cellsam-rt evaluate`: segment (or read) the prediction(s) and print the scores."""
    from cellsam_rt.io import read_image

    if args.images is not None:
        if args.pred is not None:
            from cellsam_rt.errors import CellsamRtError

            raise CellsamRtError("--pred scores one label file: use it with --image, not --images")
        return _run_folder(args)

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
        if args.truth_boxes:
            from cellsam_rt.tools.evaluate import truth_boxes

            t0 = time.perf_counter()
            boxed = seg.segment(image, channels=args.channels, boxes=truth_boxes(truth))
            rows.append((f"{name} (truth boxes)",
                         {**evaluate(boxed.labels, truth), "seconds": time.perf_counter() - t0}))
    if args.baseline:
        from cellsam_rt.tools.baseline import otsu_watershed

        t0 = time.perf_counter()
        base = otsu_watershed(image, channels=args.channels)
        rows.append(("otsu+watershed", {**evaluate(base, truth), "seconds": time.perf_counter() - t0}))
    if args.csv is not None:
        _write_csv(args.csv, [{"image": args.image.stem, "method": n, **r} for n, r in rows])
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
