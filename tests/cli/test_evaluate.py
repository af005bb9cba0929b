"""Instance matching and scores on hand-made label images with known answers; the baseline."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from cellsam_rt.tools.baseline import otsu_watershed
from cellsam_rt.cli.evaluate import add_arguments, format_table
from cellsam_rt.tools.evaluate import evaluate, match_instances


def _square(img, label, y, x, size):
    img[y:y + size, x:x + size] = label


def test_identical_labels_score_one():
    truth = np.zeros((40, 40), np.int32)
    _square(truth, 1, 2, 2, 10)
    _square(truth, 7, 20, 20, 8)
    r = evaluate(truth, truth)
    assert r["f1@0.5"] == r["f1@0.75"] == r["f1@0.9"] == 1.0
    assert r["precision"] == r["recall"] == r["mean_iou"] == 1.0
    assert (r["tp"], r["fp"], r["fn"], r["n_true"], r["n_pred"]) == (2, 0, 0, 2, 2)


def test_label_values_do_not_matter():
    truth = np.zeros((30, 30), np.uint16)
    _square(truth, 3, 0, 0, 10)
    _square(truth, 9, 15, 15, 10)
    pred = np.zeros((30, 30), np.int64)
    _square(pred, 100, 15, 15, 10)
    _square(pred, 5, 0, 0, 10)
    assert evaluate(pred, truth)["f1@0.9"] == 1.0


def test_known_f1_with_misses_and_false_positives():
    truth = np.zeros((100, 100), np.int32)
    pred = np.zeros((100, 100), np.int32)
    # 1: exact match; 2: 10x10 truth vs 10x8 prediction (IoU 0.8); 3: missed;
    # 4 (pred): false positive in the background.
    _square(truth, 1, 0, 0, 10)
    _square(pred, 1, 0, 0, 10)
    _square(truth, 2, 30, 30, 10)
    pred[30:40, 30:38] = 2
    _square(truth, 3, 60, 60, 10)
    _square(pred, 4, 80, 5, 6)
    r = evaluate(pred, truth)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["f1@0.5"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert r["f1@0.75"] == pytest.approx(4 / 6)  # IoU 0.8 still counts
    assert r["f1@0.9"] == pytest.approx(2 / (2 + 2 + 2))  # only the exact match: tp 1, fp 2, fn 2
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["mean_iou"] == pytest.approx((1.0 + 0.8) / 2)
    assert r["area_ratio"] == pytest.approx((1.0 + 0.8) / 2)  # median of 100/100 and 80/100


def test_area_ratio_tells_wider_from_tighter_masks():
    from cellsam_rt.tools.evaluate import mean_rows

    truth = np.zeros((60, 60), np.int32)
    _square(truth, 1, 10, 10, 10)
    _square(truth, 2, 35, 35, 10)
    wide = np.zeros_like(truth)
    _square(wide, 5, 9, 9, 12)  # one pixel wider on every side
    _square(wide, 6, 34, 34, 12)
    tight = np.zeros_like(truth)
    _square(tight, 1, 11, 11, 8)
    assert evaluate(wide, truth)["area_ratio"] == pytest.approx(144 / 100)
    assert evaluate(tight, truth)["area_ratio"] == pytest.approx(64 / 100)
    nothing = evaluate(np.zeros_like(truth), truth)
    assert nothing["area_ratio"] is None
    rows = [{"image": name, "method": "m", **r} for name, r in
            (("a", evaluate(wide, truth)), ("b", evaluate(tight, truth)), ("c", nothing))]
    assert mean_rows(rows)[0]["area_ratio"] == pytest.approx((1.44 + 0.64) / 2)  # matched images only


def test_merged_prediction_matches_at_most_one_truth():
    truth = np.zeros((20, 40), np.int32)
    truth[:, :20] = 1
    truth[:, 20:] = 2
    pred = np.zeros_like(truth)
    pred[:, :] = 1  # one blob covering both: IoU 0.5 with each
    m = match_instances(pred, truth, 0.5)
    assert m.tp == 1 and m.fp == 0 and m.fn == 1
    assert match_instances(pred, truth, 0.51).tp == 0


def test_low_threshold_uses_optimal_assignment():
    # Greedy pairing by IoU takes truth 1-pred 1 (IoU 10/28) first and then has nothing left for
    # pred 2; the maximum one-to-one matching pairs truth 2-pred 1 (8/30) and truth 1-pred 2 (6/20).
    truth = np.zeros((10, 40), np.int32)
    pred = np.zeros_like(truth)
    truth[:, 0:20] = 1
    truth[:, 20:40] = 2
    pred[:, 10:28] = 1
    pred[:, 0:6] = 2
    m = match_instances(pred, truth, 0.25)
    assert m.tp == 2
    assert {(t, p) for t, p, _ in m.pairs} == {(2, 1), (1, 2)}
    assert m.mean_iou == pytest.approx((8 / 30 + 6 / 20) / 2)
    # Above 0.3 only truth 1-pred 1 qualifies.
    m = match_instances(pred, truth, 0.31)
    assert [(t, p) for t, p, _ in m.pairs] == [(1, 1)]


def test_empty_images():
    z = np.zeros((8, 8), np.int32)
    assert evaluate(z, z)["f1@0.5"] == 1.0
    one = z.copy()
    one[2:5, 2:5] = 1
    r = evaluate(z, one)
    assert r["f1@0.5"] == 0.0 and r["recall"] == 0.0 and r["fn"] == 1
    r = evaluate(one, z)
    assert r["f1@0.5"] == 0.0 and r["precision"] == 0.0 and r["fp"] == 1


def test_bad_inputs_are_refused():
    a = np.zeros((5, 5), np.int32)
    with pytest.raises(ValueError, match="shape"):
        evaluate(a, np.zeros((5, 6), np.int32))
    with pytest.raises(ValueError, match="boolean"):
        evaluate(a.astype(bool), a)
    with pytest.raises(ValueError):
        match_instances(a, a, 0.0)


def test_baseline_separates_touching_discs():
    yy, xx = np.mgrid[:80, :120]
    truth = np.zeros((80, 120), np.int32)
    truth[(yy - 40) ** 2 + (xx - 40) ** 2 < 15 ** 2] = 1
    truth[(yy - 40) ** 2 + (xx - 68) ** 2 < 15 ** 2] = 2  # touching the first
    truth[(yy - 15) ** 2 + (xx - 100) ** 2 < 8 ** 2] = 3
    image = np.where(truth > 0, 200, 10).astype(np.uint16)
    labels = otsu_watershed(image)
    r = evaluate(labels, truth)
    assert r["n_pred"] == 3 and r["f1@0.75"] == 1.0


def test_cli_arguments_and_table():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--image", "a.tif", "--truth", "b.tif", "--baseline", "--channels", "0,1"])
    assert args.baseline and args.channels == (0, 1) and args.model == "default"
    text = format_table([("model", {"f1@0.5": 0.9, "n_pred": 3})])
    assert "f1@0.5" in text and "0.900" in text
    # Every column name stands apart in the header, the longest included.
    from cellsam_rt.cli.evaluate import _COLUMNS, _FOLDER_COLUMNS, format_folder_table

    assert text.splitlines()[0].split()[1:] == list(_COLUMNS)
    folder = format_folder_table([{"image": "a", "method": "m", "area_ratio": 1.0}])
    assert folder.splitlines()[0].split()[2:] == list(_FOLDER_COLUMNS)


def test_evaluate_command_scores_a_label_file_and_the_baseline(tmp_path, capsys):
    import tifffile

    from cellsam_rt.cli.evaluate import run

    truth = np.zeros((64, 64), np.uint16)
    _square(truth, 1, 5, 5, 12)
    _square(truth, 2, 30, 30, 14)
    image = np.where(truth > 0, 180, 12).astype(np.uint8)
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    tifffile.imwrite(tmp_path / "image.tif", image)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--image", str(tmp_path / "image.tif"), "--truth", str(tmp_path / "truth.tif"),
                         "--pred", str(tmp_path / "truth.tif"), "--baseline", "--json"])
    assert run(args) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["truth.tif", "otsu+watershed"]
    assert rows[0]["f1@0.9"] == 1.0 and rows[1]["f1@0.5"] == 1.0


def _disc_pair(seed: int, size: int = 256, n: int = 6, radius: int = 12):
    """(uint16 image, labels) of n separate bright discs on a dim background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), np.uint16)
    k = 0
    while k < n:
        cy, cx = rng.integers(radius + 4, size - radius - 4, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        grown = (yy - cy) ** 2 + (xx - cx) ** 2 <= (radius + 4) ** 2
        if truth[grown].any():
            continue
        k += 1
        truth[disc] = k
    image = (200 + 2500 * (truth > 0) + rng.normal(0, 20, truth.shape)).astype(np.uint16)
    return image, truth


def test_truth_boxes_span_each_instance():
    from cellsam_rt.tools.evaluate import truth_boxes

    truth = np.zeros((30, 40), np.int32)
    truth[2:7, 3:13] = 1
    truth[20:30, 35:40] = 3  # label 2 absent: no box for it
    assert truth_boxes(truth).tolist() == [[3, 2, 13, 7], [35, 20, 40, 30]]
    assert truth_boxes(np.zeros((5, 5), np.int32)).shape == (0, 4)


def test_mean_rows_average_each_method_over_images():
    from cellsam_rt.tools.evaluate import SUMMARY_KEYS, mean_rows

    rows = [{"image": f"i{k}", "method": m, **{key: v for key in SUMMARY_KEYS},
             "n_true": 3, "n_pred": 2} for k, v in enumerate((0.2, 0.6)) for m in ("a", "b")]
    means = mean_rows(rows)
    assert [r["method"] for r in means] == ["a", "b"]
    assert means[0]["f1@0.5"] == pytest.approx(0.4) and means[0]["images"] == 2
    assert means[1]["n_true"] == 6 and means[1]["n_pred"] == 4


def test_evaluate_a_folder_with_model_truth_boxes_and_baseline(tmp_path, capsys):
    import csv
    import json

    import tifffile

    from cellsam_rt.cli.main import main

    (tmp_path / "images").mkdir()
    (tmp_path / "truth").mkdir()
    for seed in (0, 1):
        image, truth = _disc_pair(seed)
        tifffile.imwrite(tmp_path / "images" / f"img{seed}.tif", image)
        tifffile.imwrite(tmp_path / "truth" / f"img{seed}.tif", truth)
    rc = main(["evaluate", "--images", str(tmp_path / "images"), "--truth", str(tmp_path / "truth"),
               "--baseline", "--truth-boxes", "--json", "--csv", str(tmp_path / "scores.csv")])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["image"], r["method"]) for r in rows] == [
        (img, m) for img in ("img0", "img1")
        for m in ("cellsam-rt-small", "cellsam-rt-small (truth boxes)", "otsu+watershed")
    ] + [("mean", m) for m in ("cellsam-rt-small", "cellsam-rt-small (truth boxes)", "otsu+watershed")]
    by = {(r["image"], r["method"]): r for r in rows}
    # Separate bright discs: the baseline finds them all; prompted with the true boxes the
    # model outlines each disc.
    assert by[("img0", "otsu+watershed")]["f1@0.5"] == 1.0
    assert by[("mean", "cellsam-rt-small (truth boxes)")]["mean_iou"] > 0.7
    assert by[("mean", "otsu+watershed")]["n_true"] == 12
    mean_f1 = np.mean([by[(i, "cellsam-rt-small")]["f1@0.5"] for i in ("img0", "img1")])
    assert by[("mean", "cellsam-rt-small")]["f1@0.5"] == pytest.approx(mean_f1)
    with open(tmp_path / "scores.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9 and table[-1]["image"] == "mean"
    assert float(table[0]["f1@0.5"]) == pytest.approx(rows[0]["f1@0.5"])


def test_folder_image_without_truth_is_one_line_error(tmp_path, capsys):
    import tifffile

    from cellsam_rt.cli.main import main

    (tmp_path / "images").mkdir()
    (tmp_path / "truth").mkdir()
    image, truth = _disc_pair(0, size=64, n=1, radius=6)
    tifffile.imwrite(tmp_path / "images" / "a.tif", image)
    tifffile.imwrite(tmp_path / "images" / "b.tif", image)
    tifffile.imwrite(tmp_path / "truth" / "a.tif", truth)
    rc = main(["evaluate", "--images", str(tmp_path / "images"), "--truth", str(tmp_path / "truth")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: {tmp_path / 'images' / 'b.tif'}: no truth file named b.* in {tmp_path / 'truth'}"
    rc = main(["evaluate", "--images", str(tmp_path / "images"), "--truth", str(tmp_path / "truth" / "a.tif")])
    assert rc == 2 and "is not a folder" in capsys.readouterr().err
