"""`cellsam-rt watch DIR`: segment images as they appear in a folder (or fields of a growing
OME-Zarr plate), each once it is completely written, each once; resumable through the ledger."""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from cellsam_rt.cli.main import EXIT_FAILED_INPUTS, EXIT_OK, EXIT_USAGE, error
from cellsam_rt.cli.options import positive_float
from cellsam_rt.cli.run import add_batch_options, make_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt watch` (those of `run`, plus polling)."""
    parser.add_argument("folder", type=Path, metavar="DIR",
                        help="folder to watch for image files and OME-Zarr stores (not "
                             "recursive), or one OME-Zarr plate that grows")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder, as for `run`; may be left out when DIR is an "
                             "OME-Zarr store (labels and <store>/tables/ go into it)")
    add_batch_options(parser)
    w = parser.add_argument_group("watching")
    w.add_argument("--poll-interval", type=positive_float, default=2.0, metavar="S",
                   help="seconds between scans; an image is taken once it is unchanged over "
                        "two scans (default 2)")
    w.add_argument("--poll", action="store_true",
                   help="scan on the interval only, without file-system events (network "
                        "shares deliver none)")
    w.add_argument("--exit-when-idle", type=positive_float, default=None, metavar="S",
                   help="exit (status 0) once nothing new has appeared for S seconds")
    w.add_argument("--table-every", type=positive_float, default=60.0, metavar="S",
                   help="rewrite cells.parquet at most every S seconds while watching "
                        "(default 60; always on exit)")


def run(args: argparse.Namespace) -> int:
    """Watch until SIGINT/SIGTERM (the current image is finished first) or --exit-when-idle."""
    from cellsam_rt.errors import CellsamRtError, OutputDirError
    from cellsam_rt.io import ngff, prepare_output_dir
    from cellsam_rt.workflows.batch import STORE_TABLES, RunTarget, summary_line
    from cellsam_rt.workflows.watch import FolderWatcher, install_stop_handlers

    folder = args.folder.expanduser()
    if not folder.is_dir():
        error(f"{folder}: not a folder")
        return EXIT_USAGE
    if args.out is None:
        if not ngff.is_ngff_store(folder):
            error(f"{folder}: watching a folder needs --out DIR (only an OME-Zarr store can "
                  "take its labels and table in place)")
            return EXIT_USAGE
        target = RunTarget(run_dir=folder / STORE_TABLES)
    else:
        target = RunTarget(run_dir=args.out, files_dir=args.out, mirror_root=args.out)
    try:
        prepare_output_dir(target.run_dir)
    except OutputDirError as exc:
        error(exc)
        return EXIT_USAGE
    stop = threading.Event()
    try:
        engine = make_engine(args, None, stop)
    except (CellsamRtError, ValueError) as exc:
        error(exc)
        return EXIT_USAGE
    watcher = FolderWatcher(folder, poll=args.poll_interval, use_events=not args.poll,
                            level=args.level, stop=stop)
    restore = install_stop_handlers(stop, watcher.wake)
    if not args.quiet:
        print(f"watching {folder} (every {args.poll_interval:g} s"
              + (f", exit after {args.exit_when_idle:g} s idle" if args.exit_when_idle else "")
              + "); Ctrl-C to stop", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        summary = engine.run(target, watcher.items(target, args.exit_when_idle),
                             combine_every=args.table_every)
    finally:
        watcher.close()
        restore()
    if not args.quiet:
        print(summary_line([summary], time.perf_counter() - started)
              + ("; stopped" if stop.is_set() else ""), file=sys.stderr)
    return EXIT_FAILED_INPUTS if summary.failed else EXIT_OK
