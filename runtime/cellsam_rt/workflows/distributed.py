"""Distributed runs on Dask: one task per image (file or OME-Zarr field) on a `distributed`
cluster, with the same outputs as a single-process `cellsam-rt run`.

The client process plans the run, keeps the ledger (a "start" record before an image is
submitted, a "done" record when its task's result comes back, each key once), skips finished
images exactly as `run` does and combines the table parts into cells.parquet at the end. Each
worker process loads the model once (a per-process cache keyed by the options) and writes the
image's labels, CSV and table part itself with BatchEngine's own read/segment/write functions, so
the workers and the client must see the run's folders under the same paths (one machine, or a
shared file system).

A worker that dies mid-task: the scheduler reruns its tasks on another worker. Every output is
written atomically (or, for OME-Zarr labels, idempotently), so a rerun rewrites the same bytes and
nothing is left half-written; temporary files of a killed writer are removed at the end.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

from cellsam_rt.io import ngff_labels
from cellsam_rt.workflows.batch import (BatchEngine, BatchOptions, RunTarget, Summary,
                                        WorkItem, clean_temp_files, expected_error,
                                        failure_line)
from cellsam_rt.workflows.ledger import LEDGER_NAME, Ledger

_LOCAL = re.compile(r"^local:(\d+)$")
CONNECT_TIMEOUT = "5s"
TASK_RETRIES = 2


class SchedulerError(RuntimeError):
    """The Dask scheduler cannot be reached (exit status 2)."""


def check_scheduler(text: str) -> str:
    """A scheduler address (tcp://host:8786, host:8786, ...) or local:N with N >= 1."""
    text = text.strip()
    if text.startswith("local:"):  # (not localhost:8786)
        m = _LOCAL.match(text)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"expected local:N with N >= 1 worker processes, got {text!r}")
    elif not text:
        raise ValueError("empty scheduler address")
    return text


@contextmanager
def connect(scheduler: str) -> Iterator:
    """A `distributed.Client`: to the scheduler at an address, or to a LocalCluster of N worker
    processes (one thread each) that is started here and closed on exit."""
    from distributed import Client, LocalCluster

    m = _LOCAL.match(scheduler)
    if m:
        cluster = LocalCluster(n_workers=int(m.group(1)), threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise SchedulerError(f"cannot reach the Dask scheduler at {scheduler}: {reason}") from None
    try:
        yield client
    finally:
        client.close()


# ---------------------------------------------------------------- worker side

_ENGINES: dict[str, BatchEngine] = {}
_ENGINES_LOCK = threading.Lock()


def worker_engine(opts: BatchOptions, model: str) -> tuple[BatchEngine, threading.Lock]:
    """This process's engine for these options: the model is loaded once per worker process."""
    key = repr((opts.segmenter, opts.result_options(), model))
    with _ENGINES_LOCK:
        entry = _ENGINES.get(key)
        if entry is None:
            from cellsam_rt.pipeline import Segmenter

            engine = BatchEngine(None, dataclasses.replace(opts, quiet=True), model)
            engine.segmenter = Segmenter(**opts.segmenter)
            _ENGINES.clear()  # one loaded model per process
            _ENGINES[key] = entry = (engine, threading.Lock())
    return entry


def segment_task(item: WorkItem, target: RunTarget, fp: dict | None, opts: BatchOptions,
                 model: str) -> dict:
    """One image on a worker: read, segment, write its outputs; returns its ledger record.

    A problem with the input (an input error or a ValueError) comes back as {"error": line}, not
    retried; anything else raises, so Dask retries the task (and --debug shows its traceback).
    """
    engine, lock = worker_engine(opts, model)
    started = time.perf_counter()
    try:
        with lock:  # a worker with several threads segments one image at a time
            item, fp, n_cells, outputs, where = engine.segment_one((item, target, fp))
    except Exception as exc:  # noqa: BLE001 - sorted out below
        if not expected_error(exc) and (opts.debug or not isinstance(exc, ValueError)):
            raise
        return {"key": item.key, "error": failure_line(item, exc)}
    return {"key": item.key, "input": fp, "n_cells": n_cells, "outputs": outputs,
            "where": where, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- client side

@dataclasses.dataclass
class _Pending:
    summary: Summary
    target: RunTarget
    item: WorkItem
    fp: dict | None
    order: int


def _precreate_mirror(item: WorkItem, target: RunTarget) -> None:
    """Create a mirrored store's plate/well groups once here, so workers never race on them."""
    if item.is_zarr and target.mirror_root is not None:
        store, _ = ngff_labels.label_target(item.source, target.mirror_root)
        ngff_labels._mirror_groups(item.source, store)  # noqa: SLF001 - same package family


def run_distributed(client, targets: Sequence[tuple[RunTarget, list[WorkItem]]],
                    opts: BatchOptions, model: str,
                    stop: threading.Event | None = None) -> list[Summary]:
    """Segment every target's items as Dask tasks; one Summary per target (as BatchEngine.run)."""
    from distributed import as_completed
    from tqdm import tqdm

    stop = stop or threading.Event()
    engine = BatchEngine(None, opts, model, stop=stop)  # selection, messages, table combining
    options = opts.result_options()
    started = time.perf_counter()
    runs, pending = [], {}
    for target, items in targets:
        target.run_dir.mkdir(parents=True, exist_ok=True)
        clean_temp_files(target)
        target.ledger = Ledger(target.run_dir / LEDGER_NAME)
        summary, skipped, done = Summary(), [], {}
        runs.append((target, summary, skipped, done))
        shipped = dataclasses.replace(target, ledger=None)  # the ledger stays with the client
        for order, (item, _, fp) in enumerate(engine._select(target, items, summary, skipped)):
            if item.error is not None:
                summary.failed += 1
                engine._report(item, item.error)
                continue
            target.ledger.start(item.key)
            _precreate_mirror(item, target)
            fut = client.submit(segment_task, item, shipped, fp, opts, model,
                                retries=TASK_RETRIES, pure=False)
            pending[fut] = _Pending(summary, target, item, fp, order)
        if summary.skipped and not opts.quiet:
            print(f"{target.run_dir}: {summary.skipped} images already segmented "
                  "(skipped; --overwrite redoes them)", file=sys.stderr, flush=True)
    bar = tqdm(total=len(pending), unit="image", disable=True if opts.quiet else None,
               dynamic_ncols=True, leave=False, file=sys.stderr)
    engine._bar = bar
    try:
        for fut in as_completed(list(pending)):
            p = pending[fut]
            _collect(engine, fut, p, runs, options)
            bar.update(1)
            if stop.is_set():
                client.cancel(list(pending))
                for _, summary, _, _ in runs:
                    summary.interrupted = True
                break
    finally:
        engine._bar = None
        bar.close()
    summaries = []
    for target, summary, skipped, done in runs:
        final = skipped + [done[k] for k in sorted(done)]  # finished ones in input order
        summary.table = engine._combine(target, final)
        clean_temp_files(target)  # a killed worker's temporary files
        summary.seconds = time.perf_counter() - started
        summaries.append(summary)
    return summaries


def _collect(engine: BatchEngine, fut, p: _Pending, runs: list, options: dict) -> None:
    """Record one finished task: its ledger "done" record (once per key), or its error line."""
    try:
        rec = fut.result()
    except Exception as exc:  # noqa: BLE001 - a task that failed after its retries
        p.summary.failed += 1
        engine._report(p.item, exc)
        return
    if "error" in rec:
        p.summary.failed += 1
        engine.say(rec["error"], failure=True)
        return
    done = next(d for t, _, _, d in runs if t is p.target)
    if p.order in done:
        return
    p.target.ledger.finish(rec["key"], rec["input"], engine.model, options,
                           [os.path.relpath(o, p.target.run_dir) for o in rec["outputs"]])
    done[p.order] = rec["key"]
    p.summary.segmented += 1
    src = p.item.source.key if p.item.is_zarr else p.item.source
    engine.say(f"{src}: {rec['n_cells']} cells -> {rec['where']} ({rec['seconds']:.2f} s)")


__all__ = ["SchedulerError", "check_scheduler", "connect", "run_distributed", "segment_task",
           "worker_engine"]
