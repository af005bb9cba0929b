"""A pipelined runner: CPU workers prepare the next items while the current batch runs inference.

Three stages, each a plain callable:

    prepare(item) -> prepared        on `workers` threads (reading, decoding, preprocessing)
    infer(prepared) -> result        on one thread, in item order (the accelerator or ORT)
    finish(result) -> value          optional, on its own thread (postprocessing, writing)

Memory stays flat: at most `depth` items are prepared ahead of inference and at most `depth`
results wait for `finish` or for the caller, however long the input. Results come back in input
order. An exception in any stage fails only that item: it is returned with `.error` set and
the others go on. `infer_batch(list of prepared) -> list of results`, when given, runs up to
`batch_size` ready items together (tile or image batches for the GPU); if a batch fails, its
items are retried one by one so that one bad item does not fail its neighbours.

numpy, OpenCV and ONNX Runtime release the GIL in their heavy loops, so Python threads overlap
real work here.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")

_DONE = object()  # end-of-stream marker between stages


@dataclass
class ItemResult(Generic[T]):
    """The outcome for one input item: `value` on success, else `error` and the failing stage."""

    index: int
    item: Any
    value: T | None = None
    error: BaseException | None = None
    stage: str | None = None  # "prepare", "infer" or "finish" when error is set
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every stage succeeded."""
        return self.error is None


@dataclass
class RunnerStats:
    """What a run did: counts and the largest number of items held between stages."""

    items: int = 0
    failed: int = 0
    batches: int = 0
    max_in_flight: int = 0  # prepared (or being prepared) but not yet through infer
    max_results_waiting: int = 0  # inferred but not yet taken by finish/the caller
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"prepare": 0.0, "infer": 0.0,
                                                                     "finish": 0.0})

    @property
    def items_per_second(self) -> float:
        """Throughput of the whole run."""
        return self.items / self.seconds if self.seconds > 0 else 0.0


class _Cancelled(Exception):
    """Raised inside stage threads when the consumer has gone away."""


class PipelinedRunner:
    """Order-preserving, bounded three-stage pipeline over an iterable of items."""

    def __init__(self, prepare: Callable[[Any], Any], infer: Callable[[Any], Any] | None = None,
                 finish: Callable[[Any], Any] | None = None, *, workers: int = 2,
                 depth: int | None = None, batch_size: int = 1,
                 infer_batch: Callable[[list[Any]], Sequence[Any]] | None = None):
        if infer is None and infer_batch is None:
            raise ValueError("give infer, infer_batch, or both")
        if workers < 1 or batch_size < 1:
            raise ValueError("workers and batch_size must be >= 1")
        self.prepare, self.infer, self.finish = prepare, infer, finish
        self.infer_batch, self.batch_size, self.workers = infer_batch, batch_size, workers
        # Enough prepared items to fill the next batch while one runs, and to keep workers busy.
        self.depth = depth if depth is not None else max(2 * batch_size, workers + 1)
        if self.depth < batch_size:
            raise ValueError(f"depth ({self.depth}) must be >= batch_size ({batch_size})")
        self.stats = RunnerStats()

    # -------------------------------------------------------------- public API

    def run(self, items: Iterable[Any]) -> Iterator[ItemResult]:
        """Yield one ItemResult per item, in input order, while the stages overlap."""
        self.stats = stats = RunnerStats()
        stop = threading.Event()
        slots = threading.Semaphore(self.depth)
        lock = threading.Lock()
        in_flight = [0]
        prepared_q: queue.Queue = queue.Queue()  # bounded by `slots`
        inferred_q: queue.Queue = queue.Queue(maxsize=self.depth)
        out_q: queue.Queue = queue.Queue(maxsize=self.depth) if self.finish else inferred_q
        feed_error: list[BaseException] = []
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cellsam-prepare")

        def put(q: queue.Queue, obj: Any) -> None:
            while True:  # a blocking put that gives up when the consumer has gone
                if stop.is_set():
                    raise _Cancelled
                try:
                    q.put(obj, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def get(q: queue.Queue) -> Any:
            while True:
                if stop.is_set():
                    raise _Cancelled
                try:
                    return q.get(timeout=0.1)
                except queue.Empty:
                    continue

        def timed_prepare(item: Any) -> tuple[Any, float]:
            t0 = time.perf_counter()
            return self.prepare(item), time.perf_counter() - t0

        def feeder() -> None:
            try:
                for index, item in enumerate(items):
                    while not slots.acquire(timeout=0.1):
                        if stop.is_set():
                            raise _Cancelled
                    with lock:
                        in_flight[0] += 1
                        stats.max_in_flight = max(stats.max_in_flight, in_flight[0])
                    put(prepared_q, (ItemResult(index, item), pool.submit(timed_prepare, item)))
            except _Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - the input iterable itself failed
                feed_error.append(exc)
            put(prepared_q, _DONE)

        def release(n: int) -> None:
            with lock:
                in_flight[0] -= n
            for _ in range(n):
                slots.release()

        def inferrer() -> None:
            done = False
            while not done:
                first = get(prepared_q)
                if first is _DONE:
                    break
                batch: list[tuple[ItemResult, Future]] = [first]
                # Take the items already submitted to the workers (their prepares may still be
                # running); never wait for the input iterable itself, so a slow source runs
                # smaller batches instead of stalling inference.
                while len(batch) < self.batch_size:
                    try:
                        nxt = prepared_q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _DONE:
                        done = True
                        break
                    batch.append(nxt)
                self._infer_batch(batch, stats)
                release(len(batch))
                for res, _ in batch:
                    put(inferred_q, res)
            put(inferred_q, _DONE)

        def finisher() -> None:
            while True:
                res = get(inferred_q)
                if res is _DONE:
                    break
                if res.ok:
                    t0 = time.perf_counter()
                    try:
                        res.value = self.finish(res.value)
                    except Exception as exc:  # noqa: BLE001 - per-item failure
                        res.value, res.error, res.stage = None, exc, "finish"
                    res.seconds["finish"] = time.perf_counter() - t0
                put(out_q, res)
            put(out_q, _DONE)

        fatal: list[BaseException] = []

        def guarded(body: Callable[[], None]) -> Callable[[], None]:
            def target() -> None:
                try:
                    body()
                except _Cancelled:
                    pass
                except BaseException as exc:  # noqa: BLE001 - a stage thread died: stop the run
                    fatal.append(exc)
                    stop.set()
            return target

        threads = [threading.Thread(target=guarded(feeder), name="cellsam-feed", daemon=True),
                   threading.Thread(target=guarded(inferrer), name="cellsam-infer", daemon=True)]
        if self.finish:
            threads.append(threading.Thread(target=guarded(finisher), name="cellsam-finish",
                                            daemon=True))
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        try:
            while True:
                try:
                    res = out_q.get(timeout=0.1)
                except queue.Empty:
                    if fatal:
                        raise fatal[0]
                    continue
                if res is _DONE:
                    break
                stats.max_results_waiting = max(stats.max_results_waiting, out_q.qsize() + 1)
                stats.items += 1
                stats.failed += not res.ok
                for k, v in res.seconds.items():
                    stats.stage_seconds[k] += v
                stats.seconds = time.perf_counter() - t_start
                yield res
            if feed_error:
                raise feed_error[0]
        finally:
            stop.set()
            for t in threads:
                t.join()
            pool.shutdown(wait=True, cancel_futures=True)
            stats.seconds = time.perf_counter() - t_start

    def map(self, items: Iterable[Any]) -> list[ItemResult]:
        """All results of `run(items)` as a list, in input order."""
        return list(self.run(items))

    # -------------------------------------------------------------- inference of one batch

    def _infer_batch(self, batch: list[tuple[ItemResult, Future]], stats: RunnerStats) -> None:
        """Wait for the batch's prepares, run inference, record values or per-item errors."""
        ready: list[ItemResult] = []
        inputs: list[Any] = []
        for res, fut in batch:
            try:
                prepared, secs = fut.result()
                res.seconds["prepare"] = secs
                ready.append(res)
                inputs.append(prepared)
            except Exception as exc:  # noqa: BLE001 - per-item failure
                res.error, res.stage = exc, "prepare"
        if not ready:
            return
        stats.batches += 1
        t0 = time.perf_counter()
        if self.infer_batch is not None and (len(inputs) > 1 or self.infer is None):
            try:
                outputs = list(self.infer_batch(inputs))
                if len(outputs) != len(inputs):
                    raise RuntimeError(f"infer_batch returned {len(outputs)} results for "
                                       f"{len(inputs)} items")
            except Exception as exc:  # noqa: BLE001
                if self.infer is None and len(inputs) == 1:
                    ready[0].error, ready[0].stage = exc, "infer"
                    ready[0].seconds["infer"] = time.perf_counter() - t0
                    return
                outputs = None  # retried item by item below, so only the bad one fails
            if outputs is not None:
                share = (time.perf_counter() - t0) / len(ready)
                for res, out in zip(ready, outputs):
                    res.value, res.seconds["infer"] = out, share
                return
        one = self.infer or (lambda p: self.infer_batch([p])[0])
        for res, prepared in zip(ready, inputs):
            t1 = time.perf_counter()
            try:
                res.value = one(prepared)
            except Exception as exc:  # noqa: BLE001 - per-item failure
                res.error, res.stage = exc, "infer"
            res.seconds["infer"] = time.perf_counter() - t1


def run_sequential(prepare: Callable[[Any], Any], infer: Callable[[Any], Any],
                   finish: Callable[[Any], Any] | None, items: Iterable[Any]) -> Iterator[ItemResult]:
    """The same stages one item at a time, with the same per-item error handling (the baseline)."""
    for index, item in enumerate(items):
        res = ItemResult(index, item)
        for stage, fn in (("prepare", prepare), ("infer", infer), ("finish", finish)):
            if fn is None:
                continue
            t0 = time.perf_counter()
            try:
                res.value = fn(item if stage == "prepare" else res.value)
            except Exception as exc:  # noqa: BLE001
                res.value, res.error, res.stage = None, exc, stage
                break
            finally:
                res.seconds[stage] = time.perf_counter() - t0
        yield res


__all__ = ["ItemResult", "PipelinedRunner", "RunnerStats", "run_sequential"]


# ---------------------------------------------------------------- Segmenter integration


@dataclass
class SegmentJob:
    """One image to segment: a path (read on a worker thread) or an array, plus its options."""

    source: Any
    channels: Any = None
    boxes: Any = None
    name: str | None = None


@dataclass
class PreparedJob:
    """A job after the CPU stage: the image as read and the segmenter's preprocessed inputs."""

    job: SegmentJob
    image: Any
    prepared: Any = None  # Segmenter.prepare(...) output, when the Segmenter offers it


def _as_job(item: Any) -> SegmentJob:
    return item if isinstance(item, SegmentJob) else SegmentJob(item)


class SegmenterStages:
    """prepare/infer stages for a Segmenter: read + preprocess on workers, the rest in order.

    With a Segmenter that offers `prepare(image, channels)` and `segment(..., prepared=...)`,
    preprocessing (channel normalisation, CLAHE, resizing: the heaviest CPU part) moves to the
    worker threads; otherwise only reading does, and `segment` preprocesses as usual.
    """

    def __init__(self, segmenter: Any, read: Callable[[Any], Any] | None = None):
        self.segmenter = segmenter
        if read is None:
            from cellsam_rt.io import read_image  # noqa: PLC0415 - keeps runner importable on its own

            read = read_image
        self.read = read
        self.split = callable(getattr(segmenter, "prepare", None))

    def prepare(self, item: Any) -> PreparedJob:
        """Read the image if given as a path, then preprocess it (worker thread)."""
        job = _as_job(item)
        src = job.source
        image = self.read(src) if isinstance(src, (str, os.PathLike)) else src
        prepared = self.segmenter.prepare(image, channels=job.channels) if self.split else None
        return PreparedJob(job, image, prepared)

    def infer(self, p: PreparedJob) -> Any:
        """Run the model stages and postprocessing of one prepared image (inference thread)."""
        kwargs = {"channels": p.job.channels, "boxes": p.job.boxes}
        if self.split:
            kwargs["prepared"] = p.prepared
        return self.segmenter.segment(p.image, **kwargs)


def segment_many(segmenter: Any, items: Iterable[Any], *, workers: int = 2,
                 depth: int | None = None, finish: Callable[[Any], Any] | None = None,
                 read: Callable[[Any], Any] | None = None,
                 runner_out: list | None = None) -> Iterator[ItemResult]:
    """Segment paths/arrays/SegmentJobs with reading and preprocessing overlapped with inference."""
    stages = SegmenterStages(segmenter, read)
    runner = PipelinedRunner(stages.prepare, stages.infer, finish, workers=workers, depth=depth)
    if runner_out is not None:
        runner_out.append(runner)  # lets callers read runner.stats after the run
    return runner.run(items)


__all__ += ["PreparedJob", "SegmentJob", "SegmenterStages", "segment_many"]
