"""`cellsam-rt run` for images larger than memory: which inputs go blockwise, where their labels
go, and their ledger records and table parts (the same run folder as every other image).

An OME-Zarr image (or plate field) or a TIFF file goes blockwise when its plane has more than
`BLOCKWISE_PIXELS` pixels (4096 x 4096), or always with --blockwise. Its labels are an OME-Zarr
label image: `labels/<name>` of the image (in place, or in the mirrored store under --out), and
for a TIFF `<out>/<name>.zarr/labels/<name>`.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from cellsam_rt.io import label_store, ngff, ngff_labels, tables
from cellsam_rt.io.images import TIFF_EXTENSIONS
from cellsam_rt.io.lazy_images import lazy_from_ngff, open_lazy, plane_pixels
from cellsam_rt.workflows.batch import (BatchOptions, RunTarget, Summary, WorkItem,
                                        expected_error, failure_line)
from cellsam_rt.workflows.blockwise import DEFAULT_BLOCK, DEFAULT_OVERLAP, BlockPlan
from cellsam_rt.workflows.large_image import (BlockJob, Interrupted, plan_folder,
                                              segment_large)
from cellsam_rt.workflows.ledger import LEDGER_NAME, Ledger, file_fingerprint, zarr_fingerprint

BLOCKWISE_PIXELS = 4096 * 4096
TIFF_LEVEL_SIDE = 1024  # a TIFF's labels get levels down to about this size


def is_large(item: WorkItem, forced: bool = False) -> bool:
    """Whether this input goes blockwise (metadata only)."""
    if item.error is not None or item.source is None:
        return False
    if item.is_zarr:
        im = item.source
        pixels = im.shape[im.axes.index("y")] * im.shape[im.axes.index("x")]
    elif Path(item.source).suffix.lower() in TIFF_EXTENSIONS:
        pixels = plane_pixels(item.source)
    else:
        return False
    return forced or pixels > BLOCKWISE_PIXELS


def split_large(targets, forced: bool = False):
    """([(target, large items)], [(target, other items)]) with every target in both."""
    large, rest = [], []
    for target, items in targets:
        flags = [is_large(it, forced) for it in items]
        large.append((target, [it for it, f in zip(items, flags) if f]))
        rest.append((target, [it for it, f in zip(items, flags) if not f]))
    return large, rest


def destination(item: WorkItem, target: RunTarget, name: str, lazy):
    """(store, group path, LabelLayout) of an input's label image."""
    if item.is_zarr:
        store, path = ngff_labels.label_target(item.source, target.mirror_root)
        return store, path, label_store.LabelLayout.like(item.source)
    h, w = lazy.height, lazy.width
    levels = 1 + max(0, int(math.log2(max(h, w) / TIFF_LEVEL_SIDE))) if max(h, w) > 0 else 1
    return (Path(target.files_dir) / f"{item.name}.zarr", "",
            label_store.LabelLayout(axes="yx", height=h, width=w, levels=levels))


def _exists(store: Path, path: str, name: str) -> bool:
    base = store / ngff.join_path(path, "labels", name)
    return any((base / f).is_file() for f in ("zarr.json", ".zattrs", ".zgroup"))


class LargeRun:
    """Segments the large items of run targets, one image after another, each blockwise."""

    def __init__(self, opts: BatchOptions, model: str, executor, block: int = DEFAULT_BLOCK,
                 overlap: int = DEFAULT_OVERLAP, stop: threading.Event | None = None):
        self.opts, self.model, self.executor = opts, model, executor
        self.block, self.overlap = int(block), int(overlap)
        self.stop = stop or threading.Event()

    def options(self) -> dict:
        return dict(self.opts.result_options(), block=self.block, overlap=self.overlap)

    def say(self, line: str, failure: bool = False) -> None:
        if failure:
            print(f"error: {' '.join(str(line).split())}", file=sys.stderr, flush=True)
        elif not self.opts.quiet:
            print(line, flush=True)

    def run(self, target: RunTarget, items: Sequence[WorkItem]) -> Summary:
        summary = Summary()
        if not items:
            return summary
        started = time.perf_counter()
        target.run_dir.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(target.run_dir / LEDGER_NAME)
        for item in items:
            if self.stop.is_set():
                summary.interrupted = True
                break
            try:
                self._one(target, ledger, item, summary)
            except Interrupted:
                summary.interrupted = True
                break
            except Exception as exc:  # noqa: BLE001 - one line per failed image, as run does
                if self.opts.debug and not expected_error(exc):
                    raise
                summary.failed += 1
                self.say(failure_line(item, exc), failure=True)
        summary.seconds = time.perf_counter() - started
        return summary

    def _one(self, target: RunTarget, ledger: Ledger, item: WorkItem, summary: Summary) -> None:
        opts = self.opts
        started = time.perf_counter()
        if item.is_zarr:
            lazy = lazy_from_ngff(item.source, opts.planes)
            fp = zarr_fingerprint(item.source.array_dir())
            names, pixel_size = item.source.channel_names, item.source.pixel_size
        else:
            lazy = open_lazy(item.source, planes=opts.planes, axes=opts.axes)
            fp = file_fingerprint(item.source)
            names, pixel_size = (), None
        options = self.options()
        if ledger.status(item.key, fp, self.model, options) == "done" and not opts.overwrite:
            summary.skipped += 1
            if not opts.quiet:
                print(f"{item.key}: already segmented (skipped; --overwrite redoes it)",
                      file=sys.stderr, flush=True)
            return
        store, path, layout = destination(item, target, opts.label_name, lazy)
        if _exists(store, path, opts.label_name) and not opts.overwrite \
                and not ledger.owns(item.key):
            raise ngff_labels.LabelExistsError(ngff.location(store, ngff.join_path(
                path, "labels", opts.label_name)), "exists already; pass --overwrite to replace it")
        channels = ngff.resolve_channels(opts.channels, names, lazy.key)
        plan = BlockPlan(lazy.height, lazy.width, self.block, self.overlap)
        folder = plan_folder(target.run_dir, item.key, {
            "key": item.key, "input": fp, "model": self.model, "options": options,
            "shape": [lazy.height, lazy.width]})
        job = BlockJob(lazy, plan, folder, dict(opts.segmenter), channels)
        ledger.start(item.key)
        if item.is_zarr and target.mirror_root is not None:
            ngff_labels._mirror_groups(item.source, store)  # noqa: SLF001 - same package family
        res = segment_large(job, store, path, opts.label_name, layout, self.executor,
                            quiet=opts.quiet, stop=self.stop)
        part = tables.object_table(res.cells, item.keys(), names, pixel_size)
        outputs = [res.dest, tables.write_part(target.run_dir, item.key, part)]
        ledger.finish(item.key, fp, self.model, options,
                      [os.path.relpath(p, target.run_dir) for p in outputs])
        summary.segmented += 1
        self.say(f"{lazy.key}: {res.n_cells} cells -> {res.dest} ({res.blocks} blocks, "
                 f"{res.skipped_blocks} without signal; {time.perf_counter() - started:.2f} s)")


def combine_all(targets, anndata: bool = False) -> None:
    """The run's cells.parquet over every finished image, in input order."""
    for target, items in targets:
        tables.combine(target.run_dir, [it.key for it in items], anndata=anndata)


__all__ = ["BLOCKWISE_PIXELS", "LargeRun", "combine_all", "destination", "is_large",
           "split_large"]
