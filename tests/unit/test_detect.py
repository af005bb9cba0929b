"""Detection decoding (docs/design.md §2.6) against scikit-learn's KMeans and the reference's detect()."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cellsam_rt.stages.detect import (boxes_to_model_space, decode_detections, kmeans_threshold, load_boxes,
                               sigmoid, two_means_centres)

torch = pytest.importorskip("torch")
R = pytest.importorskip("cellsam_export.reference")
pytest.importorskip("sklearn")


def _score_vectors(count=30, seed=0, max_n=3500):
    """Score vectors like CellFinder's top-k plus harder shapes (uniform, unimodal, trimodal)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        kind = i % 5
        n = max_n if i % 3 == 0 else int(rng.integers(2, max_n))
        if kind == 0:  # realistic: sigmoid of background logits plus a cell cluster
            k = max(1, n // int(rng.integers(5, 40)))
            logits = np.concatenate([rng.normal(-6, 2, n - k), rng.normal(2.5, 1.5, k)])
            s = 1 / (1 + np.exp(-logits))
        elif kind == 1:  # bimodal beta mixture
            s = np.concatenate([rng.beta(2, 30, n - n // 10), rng.beta(30, 3, n // 10)])
        elif kind == 2:
            s = rng.random(n)
        elif kind == 3:
            s = np.clip(rng.normal(0.5, 0.1, n), 0, 1)
        else:  # three groups: sklearn can stop in a local optimum here
            s = np.concatenate([rng.random(n // 3) * 0.2, 0.4 + rng.random(n // 3) * 0.2,
                                0.8 + rng.random(n - 2 * (n // 3)) * 0.2])
        yield kind, np.sort(s.astype(np.float32))[::-1].copy()


def test_kmeans_threshold_matches_sklearn():
    worst = 0.0
    for kind, scores in _score_vectors():
        ref = float(R.detection_threshold(scores, 0.4))  # KMeans(n_clusters=2, random_state=42)
        ours = kmeans_threshold(scores, 0.4)
        worst = max(worst, abs(ours - ref))
        assert abs(ours - ref) <= 1e-6, (kind, scores.size, ours, ref)
    assert worst <= 1e-6  # measured: <= 6e-8 (float32 summation order only)


def test_exact_two_means_is_optimal():
    """method="exact" is the global optimum; sklearn's Lloyd run (the reference) can do worse.

    This is why the default re-enacts sklearn: even on bimodal CellFinder-like scores its k-means
    sometimes stops in another partition, and parity needs that same partition.
    """
    from sklearn.cluster import KMeans

    for kind, scores in _score_vectors(20, seed=2, max_n=400):
        lo, hi = two_means_centres(scores)
        v = np.sort(scores.astype(np.float64))

        def cost(a, b):
            near_a = np.abs(v - a) <= np.abs(v - b)
            return ((v[near_a] - a) ** 2).sum() + ((v[~near_a] - b) ** 2).sum()

        brute = min(((v[:k] - v[:k].mean()) ** 2).sum() + ((v[k:] - v[k:].mean()) ** 2).sum()
                    for k in range(1, v.size))
        assert cost(lo, hi) <= brute * (1 + 1e-9) + 1e-12
        sk = KMeans(n_clusters=2, random_state=42).fit(scores.reshape(-1, 1)).cluster_centers_.ravel()
        assert cost(lo, hi) <= cost(*sk.astype(np.float64)) * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize("scores,expected", [
    (np.array([], np.float32), 0.4),        # nothing to cluster: bbox_threshold
    (np.array([0.7], np.float32), 0.4),     # one score: the reference skips k-means
])
def test_kmeans_threshold_degenerate(scores, expected):
    assert kmeans_threshold(scores, 0.4) == expected
    assert kmeans_threshold(scores, 0.4, method="exact") == expected


@pytest.mark.parametrize("scores", [np.full(50, 0.3, np.float32), np.array([0.1, 0.9], np.float32),
                                    np.array([0.5, 0.5, 0.5, 0.9], np.float32)])
def test_kmeans_threshold_few_distinct_values_match_reference(scores):
    # One distinct value: sklearn warns and puts both centres on it; we do the same.
    ref = float(R.detection_threshold(scores, 0.4))
    assert kmeans_threshold(scores, 0.4) == pytest.approx(ref, abs=1e-7)
    assert kmeans_threshold(scores, 0.4, method="exact") == pytest.approx(ref, abs=1e-7)


def test_sigmoid_close_to_torch():
    x = (np.random.default_rng(3).normal(size=100000) * 5).astype(np.float32)
    ours = sigmoid(x)
    ref = torch.sigmoid(torch.from_numpy(x)).numpy()
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1.2e-7  # 1 ulp at most (torch's vectorised exp is not exact)
    assert (ours == ref).mean() > 0.9


def _cellfinder_outputs(q, seed, cells=40):
    rng = np.random.default_rng(seed)
    logits = rng.normal(-6, 2, size=(q, 2)).astype(np.float32)
    hit = rng.choice(q, size=min(cells, q), replace=False)
    logits[hit, rng.integers(0, 2, hit.size)] = rng.normal(3, 1.5, hit.size)
    cxcy = rng.uniform(-0.05, 1.05, size=(q, 2))  # some boxes poke out of the frame
    wh = rng.uniform(0.005, 0.2, size=(q, 2))
    return logits, np.concatenate([cxcy, wh], 1).astype(np.float32)


def _canonical(boxes, scores):
    """Boxes/scores ordered by score desc, ties broken by coordinates (torch's tie order is unspecified)."""
    order = np.lexsort((*boxes.T[::-1], -scores))
    return boxes[order], scores[order]


@pytest.mark.parametrize("q,S,seed", [(3500, 1024, 0), (100, 256, 1), (300, 256, 2), (3500, 1024, 3)])
def test_decode_detections_matches_reference(q, S, seed):
    logits, boxes = _cellfinder_outputs(q, seed)
    det = decode_detections(logits, boxes, S, 0.4)
    ref_boxes, ref_scores = R.detect(logits, boxes, S, 0.4)
    assert det.boxes.dtype == np.float32 and det.boxes.shape == (len(det), 4)
    assert len(det) == len(ref_scores) > 0
    ob, os_ = _canonical(det.boxes, det.scores)
    rb, rs = _canonical(ref_boxes, ref_scores)
    assert np.abs(os_ - rs).max() <= 1.2e-7  # sigmoid: 1 ulp
    np.testing.assert_array_equal(ob, rb)  # same float32 box arithmetic
    assert (det.boxes > S).any() or (det.boxes < 0).any()  # not clipped, like the reference
    assert np.all(np.diff(det.scores) <= 0)


def test_decode_detections_topk_and_ties():
    logits = np.full((10, 2), -5.0, np.float32)
    logits[[2, 5, 7], 1] = 4.0  # three exactly tied detections
    boxes = np.tile(np.array([[0.5, 0.5, 0.1, 0.1]], np.float32), (10, 1))
    boxes[:, 0] = np.linspace(0.1, 0.9, 10)
    det = decode_detections(logits, boxes, 100)
    assert len(det) == 3
    np.testing.assert_allclose(det.boxes[:, 0] + det.boxes[:, 2], 2 * 100 * boxes[[2, 5, 7], 0],
                               rtol=1e-6)  # ties keep query order (stable)
    # topk=None takes k = Q (10 of the 20 pairs), like PostProcess; topk caps at Q*2.
    assert len(decode_detections(logits, boxes, 100, bbox_threshold=0.0, topk=None).scores) <= 10
    empty = decode_detections(np.zeros((0, 2), np.float32), np.zeros((0, 4), np.float32), 64)
    assert empty.boxes.shape == (0, 4) and len(empty) == 0


def test_load_boxes_formats(tmp_path):
    expected = np.array([[1, 2, 30, 40], [5.5, 6, 7, 8]], np.float32)
    files = {
        "a.csv": "x1,y1,x2,y2\n1,2,30,40\n5.5,6,7,8\n",
        "b.csv": "x0,y0,x1,y1\n1,2,30,40\n\n5.5,6,7,8\n",
        "c.csv": "1,2,30,40\n5.5,6,7,8\n",
        "d.csv": "id,y1,x1,x2,y2\n0,2,1,30,40\n1,6,5.5,7,8\n",
        "a.json": json.dumps([[1, 2, 30, 40], [5.5, 6, 7, 8]]),
        "b.json": json.dumps({"boxes": [[1, 2, 30, 40], [5.5, 6, 7, 8]]}),
        "c.json": json.dumps([{"x1": 1, "y1": 2, "x2": 30, "y2": 40},
                              {"x1": 5.5, "y1": 6, "x2": 7, "y2": 8}]),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        got = load_boxes(tmp_path / name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected, err_msg=name)
    (tmp_path / "empty.csv").write_text("x1,y1,x2,y2\n")
    assert load_boxes(tmp_path / "empty.csv").shape == (0, 4)


@pytest.mark.parametrize("name,text,match", [
    ("bad.csv", "x1,y1,x2,y2\n1,2,3,4\n1,2,x,4\n", r"bad\.csv:3"),
    ("short.csv", "1,2,3,4\n1,2,3\n", r"short\.csv:2"),
    ("flip.csv", "1,2,3,4\n5,6,1,8\n", r"flip\.csv:2.*x2 < x1"),
    ("hdr.csv", "a,b,c,d\n1,2,3,4\n", r"hdr\.csv:1.*header"),
    ("bad.json", "[[1,2,3,4],\n[1,2,3]]", r"bad\.json: box 1"),
    ("broken.json", "[[1,2,3,4],\n[1,2,3,", r"broken\.json:2"),
    ("keys.json", json.dumps([{"a": 1}]), r"keys\.json: box 0.*x1,y1,x2,y2"),
    ("boxes.yaml", "x", r"boxes\.yaml.*csv or \.json"),
])
def test_load_boxes_errors_name_file_and_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        load_boxes(tmp_path / name)


def test_boxes_to_model_space():
    boxes = np.array([[10, 20, 110, 220], [0, 0, 300, 200]], np.float32)
    out = boxes_to_model_space(boxes, (200, 300), 1024)
    np.testing.assert_allclose(out, [[10 * 1024 / 300, 20 * 1024 / 200, 110 * 1024 / 300, 220 * 1024 / 200],
                                     [0, 0, 1024, 1024]], rtol=1e-6)
    # The reference multiplies float32 coordinates by a python float scale; its oracle rounds a
    # float64 product instead, so the two may differ by one float32 ulp.
    ref = R.scale_user_boxes(boxes, (200, 300), 1024)
    np.testing.assert_allclose(out, ref, rtol=2.5e-7, atol=0)
    assert out.dtype == np.float32
