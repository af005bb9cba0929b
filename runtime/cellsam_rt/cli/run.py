"""`cellsam-rt run`: segment image files; one failing input is reported, the others still run."""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from cellsam_rt.cli.main import EXIT_FAILED_INPUTS, EXIT_OK, EXIT_USAGE, error
from cellsam_rt.cli.options import (add_model_options, add_segmenter_options, count,
                                    segmenter_kwargs)


def plane(text: str) -> tuple[str, int]:
    """argparse type for --plane "Z=3"."""
    axis, sep, index = text.partition("=")
    if not sep or len(axis.strip()) != 1 or not axis.strip().isalpha():
        raise argparse.ArgumentTypeError(f"expected AXIS=INDEX such as Z=3, got {text!r}")
    try:
        return axis.strip().upper(), int(index)
    except ValueError:
        raise argparse.ArgumentTypeError(f"plane index must be an integer, got {text!r}") from None


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """--axes and --plane: how a file's dimensions are read."""
    g = parser.add_argument_group("input")
    g.add_argument("--axes", default=None, metavar="AXES",
                   help="dimension order of the input, e.g. YX, CYX, YXC, ZCYX (default: from "
                        "the file's metadata; 3-D without metadata: the smallest axis is the "
                        "channel axis)")
    g.add_argument("--plane", type=plane, action="append", default=[], metavar="AXIS=I",
                   help="for stacks: the plane to segment along a non-channel axis, e.g. Z=3 "
                        "(repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt run`."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files (TIFF/OME-TIFF, PNG, JPEG, NPY), folders (their images, "
                             "not recursive) or glob patterns")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder (created if missing): <name>_labels.tif, "
                             "<name>_cells.csv and, with --overlay, <name>_overlay.png")
    add_model_options(parser)
    add_segmenter_options(parser)
    add_input_options(parser)
    parser.add_argument("--boxes", type=Path, default=None, metavar="FILE",
                        help="use these boxes (CSV or JSON, x0,y0,x1,y1 in image pixels) instead "
                             "of detection; only with a single INPUT")
    parser.add_argument("--overlay", action="store_true",
                        help="also write <name>_overlay.png with cell outlines")
    parser.add_argument("--workers", type=count, default=1, metavar="N",
                        help="threads that read and preprocess the next images while one is "
                             "segmented (default 1; 0 = one image after another)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or per-image lines; errors are still printed")
    parser.add_argument("--debug", action="store_true",
                        help="on an unexpected error, show the full traceback")


def output_names(paths: Sequence[Path]) -> list[str]:
    """Result base names per input; repeated names get -2, -3, ... so nothing is overwritten."""
    from cellsam_rt.io import output_stem

    names, counts = [], {}
    for path in paths:
        stem = output_stem(path)
        counts[stem] = counts.get(stem, 0) + 1
        names.append(stem if counts[stem] == 1 else f"{stem}-{counts[stem]}")
    return names


def overlay_image(image, channels):
    """The picked channels in (nuclear, whole-cell) order, for display."""
    from cellsam_rt.stages.preprocess import format_channels

    n = len(channels) if channels else (1 if image.ndim == 2 else int(min(image.shape)))
    return format_channels(image, channels)[..., 3 - n:]


def run(args: argparse.Namespace) -> int:
    """Segment every input; one failing input is reported and the others still run."""
    from tqdm import tqdm

    from cellsam_rt.errors import BackendError, ImageReadError, ModelDirError, OutputDirError
    from cellsam_rt.io import (expand_inputs, overlay_outlines, prepare_output_dir, read_image,
                               write_labels_tiff, write_png, write_table_csv)
    from cellsam_rt.pipeline import Segmenter
    from cellsam_rt.pipeline.runner import PipelinedRunner, run_sequential

    inputs = expand_inputs(args.inputs)
    if not inputs:
        error("no inputs")
        return EXIT_USAGE
    if args.boxes is not None and len(inputs) > 1:
        error(f"--boxes gives boxes for one image, but {len(inputs)} inputs were given")
        return EXIT_USAGE
    try:
        out_dir = prepare_output_dir(args.out)
    except OutputDirError as exc:
        error(exc)
        return EXIT_USAGE
    boxes = None
    if args.boxes is not None:
        from cellsam_rt.stages.detect import load_boxes
        try:
            boxes = load_boxes(args.boxes)
        except (ValueError, OSError) as exc:
            error(exc)
            return EXIT_USAGE
    planes = dict(args.plane)

    bar = tqdm(total=len(inputs), unit="image", disable=True if args.quiet else None,
               dynamic_ncols=True, leave=False)
    bar_lock = threading.Lock()  # the bar is updated from the inference thread too

    def tiles_done(done: int, total: int) -> None:
        with bar_lock:
            bar.set_postfix_str(f"tile {done}/{total}" if total > 1 else "")

    try:
        segmenter = Segmenter(**segmenter_kwargs(args), progress=tiles_done)
    except (ModelDirError, BackendError, ValueError) as exc:
        bar.close()
        error(exc)
        return EXIT_USAGE

    def say(line: str, failure: bool = False) -> None:
        """A per-image line (stdout), or with failure an error line (stderr, even with --quiet)."""
        with bar_lock:
            if failure:
                bar.clear()
                error(line)
                bar.refresh()
            elif not args.quiet:
                bar.write(line, file=sys.stdout)

    def prepare(path: Path):
        """Read, check and preprocess one input (on a worker thread when pipelined)."""
        image = read_image(path, axes=args.axes, planes=planes)
        return path, image, segmenter.prepare(image, channels=args.channels)

    def infer(item):
        """Segment one prepared input; images reach this one at a time, in input order."""
        path, image, prepared = item
        with bar_lock:
            bar.set_description_str(path.name, refresh=False)
        return image, segmenter.segment(image, channels=args.channels, boxes=boxes,
                                        prepared=prepared)

    if args.workers > 0 and len(inputs) > 1:
        results = PipelinedRunner(prepare, infer, workers=args.workers).run(inputs)
    else:
        results = run_sequential(prepare, infer, None, inputs)

    failed = 0
    started = time.perf_counter()
    for res, name in zip(results, output_names(inputs)):
        path = res.item
        t0 = time.perf_counter()
        try:
            if not res.ok:
                raise res.error
            image, result = res.value
            write_labels_tiff(out_dir / f"{name}_labels.tif", result.labels)
            write_table_csv(out_dir / f"{name}_cells.csv", result.table)
            if args.overlay:
                write_png(out_dir / f"{name}_overlay.png",
                          overlay_outlines(overlay_image(image, args.channels), result.labels))
        except ImageReadError as exc:
            failed += 1
            say(str(exc), failure=True)
        except Exception as exc:  # noqa: BLE001 - one bad input must not stop the batch
            if args.debug:
                raise
            failed += 1
            reason = str(exc) if isinstance(exc, (ValueError, BackendError, OSError)) \
                else f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
            say(f"{path}: {reason}", failure=True)
        else:
            seconds = sum(res.seconds.values()) + time.perf_counter() - t0
            say(f"{path}: {result.n_cells} cells -> {out_dir / name}_* ({seconds:.2f} s)")
        with bar_lock:
            bar.update(1)
    bar.close()
    if not args.quiet:
        ok = len(inputs) - failed
        print(f"{ok} of {len(inputs)} images segmented in {time.perf_counter() - started:.1f} s"
              + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return EXIT_FAILED_INPUTS if failed else EXIT_OK
