"""`cellsam-rt run`: segment image files and OME-Zarr images/plates; resumable through the run's
ledger. One failing input is reported (one line) and the others still run."""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from cellsam_rt.cli.main import EXIT_FAILED_INPUTS, EXIT_OK, EXIT_USAGE, error
from cellsam_rt.cli.options import (add_model_options, add_segmenter_options, count,
                                    segmenter_kwargs)
from cellsam_rt.cli.spots import add_run_spots_arguments


def plane(text: str) -> tuple[str, int]:
    """argparse type for --plane "Z=3"."""
    axis, sep, index = text.partition("=")
    if not sep or len(axis.strip()) != 1 or not axis.strip().isalpha():
        raise argparse.ArgumentTypeError(f"expected AXIS=INDEX such as Z=3, got {text!r}")
    try:
        return axis.strip().upper(), int(index)
    except ValueError:
        raise argparse.ArgumentTypeError(f"plane index must be an integer, got {text!r}") from None


def channel_spec(text: str) -> tuple:
    """argparse type for --channels: indices (0,1) or OME-Zarr channel names (DAPI,CellMask)."""
    from cellsam_rt.io.ngff import parse_channel_spec

    try:
        return parse_channel_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def label_name(text: str) -> str:
    if not text or "/" in text or text.startswith("."):
        raise argparse.ArgumentTypeError(f"a label name is one plain folder name, got {text!r}")
    return text


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """--axes and --plane: how a file's dimensions are read."""
    g = parser.add_argument_group("input")
    g.add_argument("--axes", default=None, metavar="AXES",
                   help="dimension order of an image file, e.g. YX, CYX, YXC, ZCYX (default: "
                        "from the file's metadata; 3-D without metadata: the smallest axis is "
                        "the channel axis). OME-Zarr images name their axes themselves")
    g.add_argument("--plane", type=plane, action="append", default=[], metavar="AXIS=I",
                   help="for stacks: the plane to segment along a non-channel axis, e.g. Z=3 "
                        "(repeatable)")


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    """Everything `run` and `watch` share besides the inputs."""
    add_model_options(parser)
    add_segmenter_options(parser, channels_option=False)
    parser.add_argument("--channels", type=channel_spec, default=None, metavar="N[,W]",
                        help="nuclear and, optionally, whole-cell channel: 0-based indices, or "
                             "for OME-Zarr the OMERO channel names (e.g. DAPI,CellMask); needed "
                             "for images with >3 channels")
    add_input_options(parser)
    z = parser.add_argument_group("OME-Zarr")
    z.add_argument("--level", type=count, default=0, metavar="L",
                   help="pyramid level to segment (default 0 = full resolution)")
    z.add_argument("--label-name", type=label_name, default="cells", metavar="NAME",
                   help="labels are written as labels/NAME of each image (default cells)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every image (ignore the ledger) and replace existing label "
                             "images of the same name")
    parser.add_argument("--anndata", action="store_true",
                        help="also write cells.h5ad (obs = objects, X = mean intensity per "
                             "channel) next to cells.parquet")
    parser.add_argument("--overlay", action="store_true",
                        help="also write <name>_overlay.png with cell outlines (image files)")
    parser.add_argument("--workers", type=count, default=1, metavar="N",
                        help="threads that read and preprocess the next images while one is "
                             "segmented (default 1; 0 = one image after another)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or per-image lines; errors are still printed")
    parser.add_argument("--debug", action="store_true",
                        help="on an unexpected error, show the full traceback")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt run`."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files (TIFF/OME-TIFF, PNG, JPEG, NPY), OME-Zarr images or "
                             "HCS plates (NGFF 0.4/0.5), folders (their images and stores, not "
                             "recursive) or glob patterns")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (created if missing): <name>_labels.tif and "
                             "<name>_cells.csv per image file, OME-Zarr labels in a mirrored "
                             "store, and the run's cells.parquet + ledger.jsonl. Without it "
                             "(OME-Zarr inputs only) labels go into each input store and the "
                             "table into <store>/tables/")
    add_batch_options(parser)
    parser.add_argument("--boxes", type=Path, default=None, metavar="FILE",
                        help="use these boxes (CSV or JSON, x0,y0,x1,y1 in image pixels) instead "
                             "of detection; only with a single image")
    add_run_spots_arguments(parser)
    parser.add_argument("--scheduler", type=scheduler, default=None, metavar="ADDRESS|local:N",
                        help="run one task per image on Dask: a Dask scheduler address, e.g. "
                             "tcp://host:8786, or local:N for N worker processes on this machine "
                             "(workers must see the inputs and --out under the same paths)")
    add_blockwise_options(parser)


def add_blockwise_options(parser: argparse.ArgumentParser) -> None:
    """--blockwise, --block, --block-overlap: images larger than memory."""
    from cellsam_rt.workflows.blockwise import DEFAULT_BLOCK, DEFAULT_OVERLAP

    g = parser.add_argument_group("images larger than memory")
    g.add_argument("--blockwise", action="store_true",
                   help="segment every OME-Zarr image and TIFF file block by block into an "
                        "OME-Zarr label image (default: only those with more than 4096 x 4096 "
                        "pixels in a plane); a TIFF's labels go to <out>/<name>.zarr")
    g.add_argument("--block", type=count, default=DEFAULT_BLOCK, metavar="PX",
                   help=f"block side in pixels for blockwise segmentation (default "
                        f"{DEFAULT_BLOCK})")
    g.add_argument("--block-overlap", type=count, default=DEFAULT_OVERLAP, metavar="PX",
                   help=f"margin each block is segmented with, at most half a block; cells "
                        f"narrower than it that cross block borders stay whole (default "
                        f"{DEFAULT_OVERLAP})")


def scheduler(text: str) -> str:
    """argparse type for --scheduler."""
    from cellsam_rt.workflows.distributed import check_scheduler

    try:
        return check_scheduler(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def batch_options(args: argparse.Namespace, boxes=None):
    """BatchOptions from the parsed arguments."""
    from cellsam_rt.workflows.batch import BatchOptions

    return BatchOptions(channels=args.channels, axes=args.axes, planes=dict(args.plane),
                        level=args.level, label_name=args.label_name, overwrite=args.overwrite,
                        anndata=args.anndata, overlay=args.overlay, boxes=boxes,
                        workers=args.workers, quiet=args.quiet, debug=args.debug,
                        segmenter=segmenter_kwargs(args))


def make_engine(args: argparse.Namespace, boxes=None, stop: threading.Event | None = None):
    """The loaded model wrapped in a BatchEngine; errors are CellsamRtError/ValueError."""
    from cellsam_rt.pipeline import Segmenter
    from cellsam_rt.workflows.batch import BatchEngine
    from cellsam_rt.workflows.ledger import model_digest

    opts = batch_options(args, boxes)
    engine = BatchEngine(None, opts, "", stop=stop)
    engine.segmenter = Segmenter(**opts.segmenter, progress=engine.tiles_done)
    backend = engine.segmenter.backend
    if hasattr(backend, "load"):  # a broken graph file is one error now, not one per image
        backend.load()
    engine.model = model_digest(engine.segmenter.model_dir)
    return engine


def run(args: argparse.Namespace) -> int:
    """Segment every input into its run target; finished images of an earlier run are skipped."""
    from cellsam_rt.errors import CellsamRtError, OutputDirError
    from cellsam_rt.io import prepare_output_dir
    from cellsam_rt.workflows.batch import UsageError, plan
    from cellsam_rt.workflows.watch import install_stop_handlers

    try:
        targets = plan(args.inputs, args.out, level=args.level)
    except UsageError as exc:
        error(exc)
        return EXIT_USAGE
    n_items = sum(len(items) for _, items in targets)
    if args.boxes is not None and n_items != 1:
        error(f"--boxes gives boxes for one image, but {n_items} inputs were given")
        return EXIT_USAGE
    if args.spots is not None:
        single = targets[0][1][0] if n_items == 1 else None
        if single is None or single.is_zarr or single.source is None:
            error(f"--spots assigns spots to one image file's cells, but {n_items} inputs were "
                  "given (use `cellsam-rt spots LABELS SPOTS` for others)")
            return EXIT_USAGE
        if not args.spots.is_file():
            error(f"{args.spots}: spots table not found")
            return EXIT_USAGE
    try:
        for target, _ in targets:
            prepare_output_dir(target.run_dir)
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
    large, rest = split_blockwise(args, targets)
    if large is None:
        return EXIT_USAGE
    stop = threading.Event()
    if args.scheduler is not None:
        return run_on_dask(args, targets, boxes, stop, large, rest)
    try:
        engine = make_engine(args, boxes, stop)
    except (CellsamRtError, ValueError) as exc:
        error(exc)
        return EXIT_USAGE
    restore = install_stop_handlers(stop)
    started = time.perf_counter()
    summaries = []
    try:
        if large:
            from cellsam_rt.workflows.blockwise import keep_segmenter
            from cellsam_rt.workflows.large_image import LocalExecutor

            keep_segmenter(engine.opts.segmenter, engine.segmenter)  # one model in memory
            summaries += run_large(args, engine.opts, engine.model, LocalExecutor(), large, stop)
        for target, items in rest:
            if stop.is_set():
                break
            summaries.append(engine.run(target, items, total=len(items)))
    finally:
        restore()
    if large:
        from cellsam_rt.workflows.large_run import combine_all

        combine_all(targets, anndata=args.anndata)
    return finish(args, targets, summaries, time.perf_counter() - started, stop)


def split_blockwise(args: argparse.Namespace, targets) -> tuple:
    """(blockwise targets, other targets): [] and all targets when no input goes blockwise;
    (None, None) after an error line."""
    from cellsam_rt.workflows.large_run import split_large

    if args.block_overlap > args.block // 2 or args.block < 64:
        error(f"--block {args.block} must be >= 64 and --block-overlap {args.block_overlap} at "
              "most half of it")
        return None, None
    large, rest = split_large(targets, forced=args.blockwise)
    if not any(items for _, items in large):
        return [], targets
    if args.boxes is not None or args.spots is not None:
        error("--boxes and --spots work with images segmented whole, not blockwise "
              "(images over 4096 x 4096 pixels, or --blockwise)")
        return None, None
    return [(t, i) for t, i in large if i], [(t, i) for t, i in rest if i]


def run_large(args: argparse.Namespace, opts, model: str, executor, large, stop) -> list:
    """Blockwise segmentation of the large inputs, one image after another."""
    from cellsam_rt.workflows.large_run import LargeRun

    runner = LargeRun(opts, model, executor, args.block, args.block_overlap, stop)
    summaries = []
    for target, items in large:
        if stop.is_set():
            break
        summaries.append(runner.run(target, items))
    return summaries


def run_on_dask(args: argparse.Namespace, targets, boxes, stop: threading.Event, large=(),
                rest=None) -> int:
    """--scheduler: the same run as Dask tasks, one per image; this process keeps the ledger."""
    from cellsam_rt.errors import CellsamRtError
    from cellsam_rt.model_dir import resolve_model
    from cellsam_rt.workflows.distributed import SchedulerError, connect, run_distributed
    from cellsam_rt.workflows.ledger import model_digest
    from cellsam_rt.workflows.watch import install_stop_handlers

    opts = batch_options(args, boxes)
    try:
        model = model_digest(resolve_model(opts.segmenter.get("model", "default")))
    except (CellsamRtError, ValueError, OSError) as exc:
        error(exc)
        return EXIT_USAGE
    started = time.perf_counter()
    try:
        with connect(args.scheduler) as client:
            restore = install_stop_handlers(stop)
            try:
                summaries = []
                if large:
                    from cellsam_rt.workflows.large_image import DaskExecutor

                    summaries += run_large(args, opts, model, DaskExecutor(client), large, stop)
                summaries += run_distributed(client, targets if rest is None else rest, opts,
                                             model, stop)
            finally:
                restore()
    except SchedulerError as exc:
        error(exc)
        return EXIT_USAGE
    if large:
        from cellsam_rt.workflows.large_run import combine_all

        combine_all(targets, anndata=args.anndata)
    return finish(args, targets, summaries, time.perf_counter() - started, stop)


def finish(args: argparse.Namespace, targets, summaries, seconds: float,
           stop: threading.Event) -> int:
    """The summary line, --spots, and the exit status."""
    from cellsam_rt.workflows.batch import summary_line

    if not args.quiet:
        print(summary_line(summaries, seconds)
              + ("; interrupted" if stop.is_set() else ""), file=sys.stderr)
    if stop.is_set():
        return 130
    failed = any(s.failed for s in summaries)
    if args.spots is not None and not failed and not assign_spots(args, *targets[0]):
        failed = True
    return EXIT_FAILED_INPUTS if failed else EXIT_OK


def assign_spots(args: argparse.Namespace, target, items) -> bool:
    """--spots: assign the spots table to the cells just written for the one image file."""
    import tifffile

    from cellsam_rt.cli.spots import assign_run_spots
    from cellsam_rt.workflows.spots import format_summary

    item = items[0]
    labels = tifffile.imread(target.files_dir / f"{item.name}_labels.tif")
    try:
        summary = assign_run_spots(args, labels, Path(item.source), target.files_dir, item.name)
    except ValueError as exc:  # SpotsError: one line naming the spots file
        error(exc)
        return False
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(f"{item.source}: {format_summary(summary)}")
    return True
