"""The pipelined runner: order, bounded memory, per-item errors, batching, and equality with
sequential runs on the tiny model through ONNX Runtime CPU."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cellsam_rt.pipeline.runner import PipelinedRunner, SegmentJob, run_sequential, segment_many


def _jitter(i: int) -> float:
    return ((i * 7919) % 13) / 2000.0  # deterministic 0..6 ms


def test_results_come_back_in_input_order_despite_uneven_work():
    def prepare(i):
        time.sleep(_jitter(i))
        return i * 10

    runner = PipelinedRunner(prepare, lambda p: p + 1, lambda r: -r, workers=3)
    out = runner.map(range(60))
    assert [r.index for r in out] == list(range(60))
    assert [r.value for r in out] == [-(i * 10 + 1) for i in range(60)]
    assert runner.stats.items == 60 and runner.stats.failed == 0


def test_one_failure_per_stage_does_not_stop_the_rest():
    def prepare(i):
        if i == 3:
            raise ValueError("unreadable image 3")
        return i

    def infer(p):
        if p == 5:
            raise RuntimeError("inference failed on 5")
        return p * 2

    def finish(r):
        if r == 14:
            raise OSError("disk full for 7")
        return r

    out = PipelinedRunner(prepare, infer, finish, workers=2, depth=3).map(range(10))
    failed = {r.index: (r.stage, type(r.error).__name__, str(r.error)) for r in out if not r.ok}
    assert failed == {3: ("prepare", "ValueError", "unreadable image 3"),
                      5: ("infer", "RuntimeError", "inference failed on 5"),
                      7: ("finish", "OSError", "disk full for 7")}
    assert [r.value for r in out if r.ok] == [2 * i for i in range(10) if i not in (3, 5, 7)]
    # Same outcome as the sequential baseline, item by item.
    seq = list(run_sequential(prepare, infer, finish, range(10)))
    assert [(r.value, r.stage) for r in seq] == [(r.value, r.stage) for r in out]


def test_memory_stays_bounded_on_a_long_input():
    depth = 4
    live = [0]
    peak = [0]
    consumed = [0]
    lock = threading.Lock()

    class Prepared:  # counts how many prepared items exist at once
        def __init__(self, i):
            self.i = i
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])

    def source():
        for i in range(300):
            consumed[0] = i + 1
            yield i

    def infer(p: Prepared):
        time.sleep(0.001)  # slower than prepare: the workers run ahead until the bound stops them
        with lock:
            live[0] -= 1
        return p.i

    runner = PipelinedRunner(Prepared, infer, workers=2, depth=depth)
    seen = 0
    for res in runner.run(source()):
        assert res.value == seen
        seen += 1
        # The source is read lazily: never more than the bounded queues ahead of the consumer.
        assert consumed[0] <= seen + 3 * depth + 2
        if seen == 150:
            time.sleep(0.05)  # a slow consumer must not make the producers run away
    assert seen == 300
    assert runner.stats.max_in_flight <= depth
    assert peak[0] <= depth + 1
    assert runner.stats.max_results_waiting <= depth


def test_batches_fill_from_ready_items_and_a_bad_batch_is_retried_item_by_item():
    sizes, singles = [], []

    def infer_batch(ps):
        sizes.append(len(ps))
        if 13 in ps:
            raise RuntimeError("batch with 13")
        return [p + 100 for p in ps]

    def infer(p):
        singles.append(p)  # a batch of one ready item, or an item of a failed batch
        if p == 13:
            raise RuntimeError("13 is bad")
        return p + 100

    runner = PipelinedRunner(lambda i: i, infer, batch_size=4, depth=8, infer_batch=infer_batch)
    out = runner.map(range(30))
    assert [r.value for r in out if r.ok] == [i + 100 for i in range(30) if i != 13]
    assert [r.index for r in out if not r.ok] == [13] and str(out[13].error) == "13 is bad"
    assert max(sizes) <= 4 and sum(sizes) + len(singles) >= 30 and 13 in singles
    assert runner.stats.batches < 30


def test_infer_batch_only_reports_per_item_errors_of_single_item_batches():
    runner = PipelinedRunner(lambda i: i, infer_batch=lambda ps: [1 / p for p in ps], batch_size=3)
    out = runner.map(range(7))
    assert not out[0].ok and out[0].stage == "infer"
    assert [r.value for r in out[1:]] == [1 / i for i in range(1, 7)]


def test_closing_early_stops_the_threads():
    before = threading.active_count()
    gen = PipelinedRunner(lambda i: i, lambda p: p, lambda r: r, workers=2).run(iter(range(10**9)))
    got = [next(gen).value for _ in range(5)]
    gen.close()
    assert got == [0, 1, 2, 3, 4]
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


def test_a_failing_input_iterable_raises_after_the_items_before_it():
    def source():
        yield from range(3)
        raise OSError("listing failed")

    gen = PipelinedRunner(lambda i: i, lambda p: p).run(source())
    assert [next(gen).value for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="listing failed"):
        next(gen)


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError):
        PipelinedRunner(lambda i: i)
    with pytest.raises(ValueError):
        PipelinedRunner(lambda i: i, lambda p: p, batch_size=4, depth=2)


# ---------------------------------------------------------------- ONNX Runtime CPU, tiny model

def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 200 + 17 * i, 240 - 9 * i
        img = rng.gamma(2.0, 200.0, size=(h, w)).astype(np.uint16)
        yy, xx = np.mgrid[:h, :w]
        for _ in range(12):  # bright blobs, so detection has something to find
            cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(4, 12)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 3000
        out.append(img)
    return out


def test_pipelined_model_stages_equal_sequential_on_ort_cpu(tiny_model_dir):
    from cellsam_rt.backends import create_backend
    from cellsam_rt.model_dir import ModelDir
    from cellsam_rt.stages.preprocess import preprocess

    model = ModelDir.load(tiny_model_dir)
    backend = create_backend(model, backend="cpu", precision="fp32", threads=1)
    S = model.image_size

    def prepare(img):
        enc, fin, _ = preprocess(img, S, model.has_model_cp)
        return enc[None], fin[None]

    def infer(p):
        emb = backend.run("encoder", {"image": p[0]})["embeddings"]
        det = backend.run("cellfinder", {"image": p[1]})
        return emb, det["class_logits"], det["boxes"]

    images = _images(6)
    images[2] = np.zeros((0, 5), np.uint16)  # an unusable image fails alone
    seq = list(run_sequential(prepare, infer, None, images))
    runner = PipelinedRunner(prepare, infer, workers=2, depth=2)
    par = runner.map(images)
    assert [r.ok for r in par] == [r.ok for r in seq] == [True, True, False, True, True, True]
    assert par[2].stage == seq[2].stage == "prepare"
    for a, b in zip(seq, par):
        if a.ok:
            for x, y in zip(a.value, b.value):
                np.testing.assert_array_equal(x, y)
    assert runner.stats.max_in_flight <= 2


def _segmenter(model_dir):
    pipeline = pytest.importorskip("cellsam_rt.pipeline.segmenter")
    return pipeline.Segmenter(model_dir, backend="cpu", precision="fp32", threads=1, tile="never")


def test_segment_many_equals_segment_one_by_one(tiny_model_dir, tmp_path):
    segmenter = _segmenter(tiny_model_dir)
    images = _images(5, seed=1)
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "img3.tif"
    tifffile.imwrite(path, images[3])
    items = [images[0], SegmentJob(images[1]), tmp_path / "missing.tif", str(path), images[4]]

    expected = [segmenter.segment(img) for img in (images[0], images[1], images[3], images[4])]
    runners: list = []
    out = list(segment_many(segmenter, items, workers=2, depth=2, runner_out=runners))
    assert [r.ok for r in out] == [True, True, False, True, True]
    assert out[2].stage == "prepare" and "missing.tif" in str(out[2].error)
    for exp, res in zip(expected, [r for r in out if r.ok]):
        np.testing.assert_array_equal(res.value.labels, exp.labels)
        np.testing.assert_array_equal(res.value.scores, exp.scores)
    assert runners[0].stats.max_in_flight <= 2
