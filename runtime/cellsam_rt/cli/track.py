"""`cellsam-rt track`: segment a time-lapse (or take its labels) and link cells over time."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .main import EXIT_OK, EXIT_USAGE, error
from .options import (add_model_options, add_segmenter_options, count, segmenter_kwargs,
                      unit_float)


def _iou(text: str) -> float:
    value = unit_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..workflows.tracking import DEFAULT_MAX_GAP, DEFAULT_MIN_IOU, METHODS

    parser.description = ("Segment every frame of a time-lapse and link the cells over time: "
                          "tracks, divisions and lineages, written in the Cell Tracking "
                          "Challenge format with a tracks table for napari.")
    parser.add_argument("input", metavar="INPUT", type=Path,
                        help="a TYX or TCYX TIFF/OME-TIFF, an OME-Zarr image with a t axis, or a "
                             "folder of frames (natural name order)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder: mask000.tif... (pixels = track ids), res_track.txt, "
                             "tracks.csv (+ tracks.parquet), lineage.json")
    parser.add_argument("--labels", action="store_true",
                        help="INPUT is already segmented: a label stack or a folder of label "
                             "TIFFs (e.g. CTC mask*.tif or TRA/man_track*.tif); link only")
    parser.add_argument("--min-iou", type=_iou, default=DEFAULT_MIN_IOU, metavar="X",
                        help="least mask overlap (IoU) for a cell in consecutive frames to be "
                             f"the same cell (default {DEFAULT_MIN_IOU})")
    parser.add_argument("--max-gap", type=count, default=DEFAULT_MAX_GAP, metavar="N",
                        help="frames a cell may go undetected and keep its lineage (default "
                             f"{DEFAULT_MAX_GAP}; 0 = no gap closing)")
    parser.add_argument("--method", choices=METHODS, default="overlap",
                        help="linker (default overlap: IoU + Hungarian matching; see "
                             "docs/tracking.md)")
    parser.add_argument("--axes", default=None, metavar="AXES",
                        help="dimension order of a stack without axis metadata, e.g. TYX, TCYX "
                             "(default: from the file; a 3-D stack without names is TYX)")
    add_model_options(parser)
    add_segmenter_options(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary line")


def _bar(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=quiet, leave=False)


def _read_labels(movie, quiet: bool) -> np.ndarray:
    from ..io.movie import as_labels

    if len(movie.frame_shape) != 2:
        raise ValueError(f"{movie.source}: labels must be 2-D frames, got frames of shape "
                         f"{movie.frame_shape}")
    frames = []
    with _bar(movie.n_frames, "reading", quiet) as bar:
        for t in range(movie.n_frames):
            frames.append(as_labels(movie.frame(t), movie.where(t)))
            bar.update()
    top = max(int(f.max()) if f.size else 0 for f in frames)
    return np.stack(frames).astype(np.uint16 if top <= 65535 else np.uint32, copy=False)


def _segment(movie, args) -> np.ndarray:
    from ..pipeline import Segmenter

    seg = Segmenter(**segmenter_kwargs(args))
    out = None
    with _bar(movie.n_frames, "segmenting", args.quiet) as bar:
        for t in range(movie.n_frames):
            labels = seg.segment(movie.frame(t), channels=args.channels).labels
            if out is None:
                out = np.zeros((movie.n_frames, *labels.shape), np.uint32)
            out[t] = labels
            bar.update()
    return out


def run(args: argparse.Namespace) -> int:
    from ..backends.base import BackendError
    from ..io import ImageReadError, OutputDirError, prepare_output_dir
    from ..io.ctc import tracks_rows, write_ctc, write_json, write_tracks_table
    from ..io.movie import open_movie
    from ..model_dir import ModelDirError
    from ..workflows.tracking import link, summary_line

    started = time.perf_counter()
    try:
        movie = open_movie(args.input, axes=args.axes, labels=args.labels)
        if movie.n_frames < 1:
            raise ImageReadError(args.input, "movie has no frames")
        out = prepare_output_dir(args.out)
        stack = _read_labels(movie, args.quiet) if args.labels else _segment(movie, args)
    except (ImageReadError, OutputDirError, ModelDirError, BackendError, ValueError) as exc:
        error(exc)
        return EXIT_USAGE
    with _bar(max(stack.shape[0] - 1, 0), "linking", args.quiet) as bar:
        result = link(stack, method=args.method, min_iou=args.min_iou, max_gap=args.max_gap,
                      progress=lambda done, total: bar.update(done - bar.n))
    if result.tracks[:, 0].max(initial=0) > 65535:
        error(f"{args.input}: {result.n_tracks} tracks do not fit the CTC format's 16-bit masks")
        return EXIT_USAGE
    write_ctc(out, result.labels, result.tracks)
    write_tracks_table(out, tracks_rows(result.labels, result.parents))
    lineage = result.lineage()
    lineage.update(frames=int(stack.shape[0]), method=args.method, min_iou=args.min_iou,
                   max_gap=args.max_gap, source=str(args.input))
    write_json(out / "lineage.json", lineage)
    if not args.quiet:
        print(f"{args.input}: {summary_line(result)} -> {out} "
              f"({time.perf_counter() - started:.1f} s)")
    return EXIT_OK
