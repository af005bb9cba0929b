"""The batch engine behind `cellsam-rt run` and `watch`: image files and OME-Zarr fields in,
labels + one per-object table per run out, resumable through the run's ledger.

Items are read and preprocessed ahead on worker threads, segmented one at a time by the loaded
model, and written behind on a writer thread (`PipelinedRunner`); the main thread records each
finished image in the ledger, draws the progress bar and prints one line per problem.

Order of writes per image (what makes kill -9 safe): ledger "start" -> labels (atomic TIFF, or an
idempotent zarr write) -> CSV -> table part (atomic) -> ledger "done" (fsync'd). An image is
skipped on a rerun only once its "done" record is on disk; anything before that is redone and
rewrites the same bytes.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from cellsam_rt.io import ngff, ngff_labels, tables
from cellsam_rt.workflows.batch_plan import (STORE_TABLES, RunTarget, UsageError, WorkItem,
                                             file_item, plan, split_inputs, store_items)
from cellsam_rt.workflows.ledger import LEDGER_NAME, Ledger, file_fingerprint, zarr_fingerprint

# atomic_write's temporary files: .<name>.<random>.part
_ATOMIC_PART = re.compile(r"^\..+\.[A-Za-z0-9_]+\.part$")


@dataclass
class BatchOptions:
    """What changes how images are read, segmented and written."""

    channels: tuple | None = None            # indices or OMERO channel names
    axes: str | None = None
    planes: dict = field(default_factory=dict)
    level: int = 0
    label_name: str = ngff_labels.DEFAULT_LABEL_NAME
    overwrite: bool = False
    anndata: bool = False
    overlay: bool = False
    boxes: Any = None
    workers: int = 1
    quiet: bool = False
    debug: bool = False
    segmenter: dict = field(default_factory=dict)  # Segmenter(...) keywords (tile, backend, ...)

    def result_options(self) -> dict:
        """The options that change an image's outputs (recorded in the ledger)."""
        seg = {k: self.segmenter.get(k) for k in ("backend", "precision", "tile",
                                                  "bbox_threshold", "diameter", "decoder",
                                                  "polarity", "outline", "denoise",
                                                  "augment")}
        boxes = None if self.boxes is None else [[float(v) for v in b] for b in self.boxes]
        return dict(seg, channels=list(self.channels) if self.channels else None,
                    axes=self.axes, planes={k: int(v) for k, v in sorted(self.planes.items())},
                    level=self.level, label_name=self.label_name, overlay=self.overlay,
                    boxes=boxes)


@dataclass
class Summary:
    """What a run did."""

    segmented: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    table: Path | None = None
    interrupted: bool = False

    @property
    def total(self) -> int:
        return self.segmented + self.skipped + self.failed

def clean_temp_files(target: RunTarget) -> int:
    """Remove temporary files a killed run left in the run's own folders."""
    n = 0
    for folder in {target.run_dir, target.run_dir / tables.PARTS_DIR, target.files_dir}:
        if folder is None or not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and _ATOMIC_PART.match(p.name):
                p.unlink(missing_ok=True)
                n += 1
    return n


class BatchEngine:
    """Segments WorkItems with one loaded Segmenter; one `run()` per RunTarget."""

    def __init__(self, segmenter, options: BatchOptions, model_digest: str,
                 stop: threading.Event | None = None):
        self.segmenter, self.opts, self.model = segmenter, options, model_digest
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._bar = None

    # ---------------------------------------------------------------- output lines

    def say(self, line: str, failure: bool = False) -> None:
        """A per-image line (stdout) or an error line (stderr, even with --quiet)."""
        with self._lock:
            bar = self._bar
            if failure:
                if bar is not None:
                    bar.clear()
                print(f"error: {' '.join(str(line).split())}", file=sys.stderr, flush=True)
                if bar is not None:
                    bar.refresh()
            elif not self.opts.quiet:
                if bar is not None:
                    bar.write(line, file=sys.stdout)
                else:
                    print(line, flush=True)

    def tiles_done(self, done: int, total: int) -> None:
        """Segmenter progress callback: tiles of a large image, shown on the bar."""
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(f"tile {done}/{total}" if total > 1 else "")

    # ---------------------------------------------------------------- stages

    def fingerprint(self, item: WorkItem) -> dict:
        if item.is_zarr:
            return zarr_fingerprint(item.source.array_dir())
        return file_fingerprint(item.source)

    def _prepare(self, job: tuple) -> tuple:
        """Read + preprocess one image (worker thread)."""
        item, target, fp = job
        if item.error is not None:
            raise item.error
        if item.is_zarr:
            im = item.source
            image = im.read(self.opts.planes)
            channels = ngff.resolve_channels(self.opts.channels, im.channel_names, im.key)
        else:
            from cellsam_rt.io import read_image

            image = read_image(item.source, axes=self.opts.axes, planes=self.opts.planes)
            channels = ngff.resolve_channels(self.opts.channels, (), str(item.source))
        return job, image, channels, self.segmenter.prepare(image, channels=channels)

    def _infer(self, prepared: tuple) -> tuple:
        """Segment one prepared image (the inference thread; one at a time, in order)."""
        job, image, channels, pre = prepared
        with self._lock:
            if self._bar is not None:
                self._bar.set_description_str(Path(job[0].key).name[-30:], refresh=False)
        result = self.segmenter.segment(image, channels=channels, boxes=self.opts.boxes,
                                        prepared=pre)
        return job, image, channels, result

    def _write(self, inferred: tuple) -> tuple:
        """Write one image's labels, CSV and table part (the writer thread)."""
        from cellsam_rt.io import overlay_outlines, write_labels_tiff, write_png, write_table_csv

        (item, target, fp), image, channels, result = inferred
        if target.ledger is not None:  # None on a Dask worker: the client records the start
            target.ledger.start(item.key)
        outputs: list[str] = []
        names: Sequence[str] = ()
        pixel_size = None
        if item.is_zarr:
            im = item.source
            dest = ngff_labels.write_label_image(im, result.labels, self.opts.label_name,
                                          out_root=target.mirror_root, overwrite=True)
            outputs.append(str(dest))
            names, pixel_size = im.channel_names, im.pixel_size
            where = str(dest)
        else:
            base = target.files_dir / item.name
            outputs.append(str(write_labels_tiff(f"{base}_labels.tif", result.labels)))
            outputs.append(str(write_table_csv(f"{base}_cells.csv", result.table)))
            if self.opts.overlay:
                from cellsam_rt.stages.preprocess import format_channels

                n = len(channels) if channels else (1 if image.ndim == 2 else min(image.shape))
                shown = format_channels(image, channels)[..., 3 - int(n):]
                outputs.append(str(write_png(f"{base}_overlay.png",
                                             overlay_outlines(shown, result.labels))))
            where = f"{base}_*"
        part = tables.object_table(result.table, item.keys(), names, pixel_size)
        outputs.append(str(tables.write_part(target.run_dir, item.key, part)))
        return item, fp, result.n_cells, outputs, where

    # ---------------------------------------------------------------- selection

    def _select(self, target: RunTarget, items: Iterable[WorkItem], summary: Summary,
                final: list[str]) -> Iterator[tuple]:
        """Items that need segmenting (with their input fingerprint); finished ones are skipped."""
        options = self.opts.result_options()
        for item in items:
            if self.stop.is_set():
                return
            if item.error is not None:
                yield item, target, None
                continue
            try:
                fp = self.fingerprint(item)
            except OSError:
                yield item, target, None  # reading it reports the problem (e.g. no such file)
                continue
            state = target.ledger.status(item.key, fp, self.model, options)
            if state == "done" and not self.opts.overwrite:
                summary.skipped += 1
                final.append(item.key)
                continue
            if item.is_zarr and not self.opts.overwrite and not target.ledger.owns(item.key) \
                    and ngff_labels.label_exists(item.source, self.opts.label_name, target.mirror_root):
                store, path = ngff_labels.label_target(item.source, target.mirror_root)
                item = WorkItem(item.key, item.source, error=ngff_labels.LabelExistsError(
                    f"{store}/{path}/labels/{self.opts.label_name}".replace("//", "/"),
                    "exists already; pass --overwrite to replace it"))
            yield item, target, fp

    # ---------------------------------------------------------------- run

    def run(self, target: RunTarget, items: Iterable[WorkItem], total: int | None = None,
            combine_every: float | None = None) -> Summary:
        """Segment `items` into `target`; returns counts. Stops early when `self.stop` is set.

        With `total` given the items are classified up front (finished ones counted as skipped
        before the bar starts); otherwise lazily, as they arrive (watch mode).
        """
        from tqdm import tqdm

        from cellsam_rt.pipeline.runner import PipelinedRunner, run_sequential

        target.run_dir.mkdir(parents=True, exist_ok=True)
        clean_temp_files(target)
        target.ledger = Ledger(target.run_dir / LEDGER_NAME)
        summary, final = Summary(), []
        started = time.perf_counter()
        jobs: Iterable[tuple] = self._select(target, items, summary, final)
        if total is not None:
            jobs = list(jobs)
            total = len(jobs)
            if summary.skipped and not self.opts.quiet:
                print(f"{target.run_dir}: {summary.skipped} images already segmented "
                      "(skipped; --overwrite redoes them)", file=sys.stderr, flush=True)
        self._bar = tqdm(total=total, unit="image", disable=True if self.opts.quiet else None,
                         dynamic_ncols=True, leave=False, file=sys.stderr)
        if self.opts.workers > 0 and (total is None or total > 1):
            results = PipelinedRunner(self._prepare, self._infer, self._write,
                                      workers=self.opts.workers).run(jobs)
        else:
            results = run_sequential(self._prepare, self._infer, self._write, jobs)
        last_combine = time.monotonic()
        try:
            for res in results:
                item = res.item[0]
                if res.ok:
                    item, fp, n_cells, outputs, where = res.value
                    target.ledger.finish(item.key, fp, self.model, self.opts.result_options(),
                                         [os.path.relpath(p, target.run_dir) for p in outputs])
                    final.append(item.key)
                    summary.segmented += 1
                    secs = sum(res.seconds.values())
                    self.say(f"{item.source.key if item.is_zarr else item.source}: {n_cells} "
                             f"cells -> {where} ({secs:.2f} s)")
                else:
                    summary.failed += 1
                    self._report(item, res.error)
                with self._lock:
                    self._bar.update(1)
                if combine_every is not None and time.monotonic() - last_combine > combine_every:
                    summary.table = self._combine(target, final)
                    last_combine = time.monotonic()
                if self.stop.is_set():
                    summary.interrupted = True
                    break
        finally:
            with self._lock:
                self._bar.close()
                self._bar = None
        summary.table = self._combine(target, final)
        summary.seconds = time.perf_counter() - started
        return summary

    def _combine(self, target: RunTarget, final: list[str]) -> Path | None:
        order = list(dict.fromkeys(final))
        return tables.combine(target.run_dir, order, anndata=self.opts.anndata)

    def segment_one(self, job: tuple) -> tuple:
        """Read, segment and write one (item, target, fingerprint) job in this thread."""
        return self._write(self._infer(self._prepare(job)))

    def _report(self, item: WorkItem, exc: BaseException) -> None:
        if self.opts.debug and not expected_error(exc):
            raise exc
        self.say(failure_line(item, exc), failure=True)


def expected_error(exc: BaseException) -> bool:
    """A problem with an input, reported in one line (anything else is a bug: --debug shows it)."""
    from cellsam_rt.errors import CellsamRtError

    return isinstance(exc, (CellsamRtError, ngff.NgffError))


def failure_line(item: WorkItem, exc: BaseException) -> str:
    """The one error line for an image that failed."""
    if expected_error(exc):
        return str(exc)
    what = item.source.key if item.is_zarr else (item.source or item.key)
    reason = str(exc) if isinstance(exc, (ValueError, OSError, RuntimeError)) else \
        f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
    return f"{what}: {reason}"

def summary_line(summaries: Sequence[Summary], seconds: float) -> str:
    """"N of M images segmented in S s (R images/s); K skipped (already done); F failed"."""
    seg = sum(s.segmented for s in summaries)
    skipped = sum(s.skipped for s in summaries)
    failed = sum(s.failed for s in summaries)
    total = seg + skipped + failed
    rate = f" ({seg / seconds:.2f} images/s)" if seg and seconds > 0 else ""
    line = f"{seg} of {total} images segmented in {seconds:.1f} s{rate}"
    if skipped:
        line += f"; {skipped} skipped (already done)"
    if failed:
        line += f"; {failed} failed"
    return line


__all__ = ["BatchEngine", "BatchOptions", "RunTarget", "STORE_TABLES", "Summary", "UsageError",
           "WorkItem", "clean_temp_files", "expected_error", "failure_line", "file_item", "plan",
           "split_inputs", "store_items", "summary_line"]
