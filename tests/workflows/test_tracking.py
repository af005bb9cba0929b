"""Time-lapse tracking: linking accuracy on generated movies (scored by py-ctcmetrics), the CTC
files, the tracks table and lineage, empty frames, bad inputs, and a run from raw frames."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellsam_rt.cli.main import main
from cellsam_rt.io.ctc import (TRACKS_COLUMNS, mask_name, read_ctc, read_tracks_table,
                               track_table, write_ctc)
from cellsam_rt.io.movie import open_movie
from cellsam_rt.workflows.timelapse_synth import drop_detection, jitter_masks, make_movie
from cellsam_rt.workflows.track_metrics import score_tracking
from cellsam_rt.workflows.tracking import METHODS, link


def _gt_ctc_layout(folder: Path, movie) -> Path:
    """Ground truth the way the CTC ships it: TRA/man_trackNNN.tif + TRA/man_track.txt."""
    tra = folder / "TRA"
    tra.mkdir(parents=True)
    for t, frame in enumerate(movie.labels):
        tifffile.imwrite(tra / f"man_track{t:03d}.tif", frame)
    np.savetxt(tra / "man_track.txt", movie.tracks, fmt="%d")
    return folder


@pytest.fixture(scope="module")
def movie():
    return make_movie(n_frames=14, shape=(256, 256), n_cells=12, divisions=3, seed=4,
                      render=False)


@pytest.fixture(scope="module")
def detections(movie):
    """GT masks with one-pixel boundary noise and one dropped detection mid-track."""
    noisy = jitter_masks(movie.labels, seed=1)
    noisy, dropped = drop_detection(noisy, frame=7, seed=2)
    assert dropped in movie.labels[6] and dropped in movie.labels[8]
    return noisy


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, movie, detections):
    """`cellsam-rt track --labels` on the noisy detections, and the GT in the CTC layout."""
    root = tmp_path_factory.mktemp("tracked")
    tifffile.imwrite(root / "detections.tif", detections)
    gt = _gt_ctc_layout(root / "gt", movie)
    out = root / "res"
    assert main(["track", str(root / "detections.tif"), "--out", str(out), "--labels",
                 "--quiet"]) == 0
    return out, gt


def _check_ctc_consistent(labels: np.ndarray, tracks: np.ndarray) -> None:
    """Every track is present exactly in frames B..E; parents end before their children start."""
    rows = {int(l): (int(b), int(e), int(p)) for l, b, e, p in tracks}
    seen = {}
    for t, frame in enumerate(labels):
        for lab in np.unique(frame[frame > 0]).tolist():
            seen.setdefault(lab, []).append(t)
    assert set(seen) == set(rows)
    for lab, frames in seen.items():
        b, e, p = rows[lab]
        assert frames == list(range(b, e + 1)), lab
        if p:
            assert rows[p][1] < b, (lab, p)


def test_linking_noisy_ground_truth_scores_high(tracked, capsys):
    out, gt = tracked
    report = out.parent / "scores.json"
    assert main(["track-score", str(out), str(gt), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "TRA" in printed and "division recall" in printed
    scores = json.loads(report.read_text())
    assert scores["TRA"] >= 0.95
    assert scores["divisions_gt"] == 3
    assert scores["division_recall"] >= 0.9
    assert scores["division_precision"] >= 0.9


def test_result_files_are_consistent(tracked, movie):
    out, _ = tracked
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([mask_name(t, 14) for t in range(14)]
                           + ["res_track.txt", "tracks.csv", "tracks.parquet", "lineage.json"])
    labels, tracks = read_ctc(out)
    assert labels.shape == movie.labels.shape and labels.dtype == np.uint16
    _check_ctc_consistent(labels, tracks)

    table = read_tracks_table(out / "tracks.csv")
    assert tuple(table.columns) == TRACKS_COLUMNS
    assert len(table) == sum(len(np.unique(f[f > 0])) for f in labels)  # one row per cell
    parents = {int(l): int(p) for l, _, _, p in tracks}
    assert (table["parent_track_id"] == table["track_id"].map(parents)).all()
    row = table.iloc[len(table) // 2]
    ys, xs = np.nonzero(labels[int(row.t)] == row.track_id)
    assert row.area == ys.size and abs(row.y - ys.mean()) < 0.01 and abs(row.x - xs.mean()) < 0.01
    pd.testing.assert_frame_equal(pd.read_parquet(out / "tracks.parquet"), table,
                                  check_exact=False, atol=0.01)

    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["divisions"] == 3
    assert lineage["tracks"] == len(tracks)
    assert lineage["roots"] == int((tracks[:, 3] == 0).sum())
    # The generator's hidden cell and the dropped detection: two gaps closed.
    assert len(lineage["tracks_ended_by_gaps"]) == 2
    assert max(lin["generations"] for lin in lineage["lineages"]) == 2


def test_ctc_round_trip_and_flat_ground_truth(tmp_path, movie):
    write_ctc(tmp_path, movie.labels, movie.tracks)
    labels, tracks = read_ctc(tmp_path)
    np.testing.assert_array_equal(labels, movie.labels)
    np.testing.assert_array_equal(tracks, movie.tracks)
    np.testing.assert_array_equal(track_table(labels, movie.parents), movie.tracks)
    assert mask_name(7, 999) == "mask007.tif" and mask_name(7, 1001) == "mask0007.tif"
    # The ground truth scored against itself, in our flat layout on both sides.
    scores = score_tracking(tmp_path, tmp_path)
    assert scores["TRA"] == 1.0 and scores["DET"] == 1.0 and scores["division_f1"] == 1.0


@pytest.mark.parametrize("method", METHODS)
def test_every_linker_gives_valid_tracks(tmp_path, movie, detections, method):
    result = link(detections, method=method)
    _check_ctc_consistent(result.labels, result.tracks)
    (tmp_path / "gt").mkdir()
    write_ctc(tmp_path / "gt", movie.labels, movie.tracks)
    write_ctc(tmp_path, result.labels, result.tracks)
    assert score_tracking(tmp_path, tmp_path / "gt")["TRA"] >= 0.95


def test_empty_frame_ends_and_restarts_tracks(tmp_path):
    m = make_movie(n_frames=8, n_cells=6, divisions=0, missing=False, seed=5, render=False)
    labels = m.labels.copy()
    labels[4] = 0
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    for gap, out in ((2, tmp_path / "bridged"), (0, tmp_path / "broken")):
        assert main(["track", str(tmp_path / "labels.tif"), "--out", str(out), "--labels",
                     "--max-gap", str(gap), "--quiet"]) == 0
        res, tracks = read_ctc(out)
        _check_ctc_consistent(res, tracks)
        assert not res[4].any()
        assert set(tracks[:, 2]) == {3, 7} and set(tracks[:, 1]) == {0, 5}
        after = tracks[tracks[:, 1] == 5]
        assert len(after) == 6
        if gap:  # each cell continues its lineage after the empty frame
            assert sorted(after[:, 3]) == sorted(tracks[tracks[:, 2] == 3][:, 0])
        else:
            assert (after[:, 3] == 0).all()


def test_inputs_in_other_layouts(tmp_path, movie):
    """OME-Zarr (ome-zarr-py) label stack; natural frame order; OME-TIFF TCYX axes."""
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    store = tmp_path / "movie.zarr"
    write_image(movie.labels, zarr.group(store=parse_url(str(store), mode="w").store), axes="tyx",
                scaler=None)
    assert main(["track", str(store), "--out", str(tmp_path / "zr"), "--labels", "--quiet"]) == 0
    res, tracks = read_ctc(tmp_path / "zr")
    assert res.shape == movie.labels.shape
    assert len(tracks) == len(movie.tracks)

    frames = tmp_path / "frames"
    frames.mkdir()
    for t in (0, 1, 2, 10):
        tifffile.imwrite(frames / f"f{t}.tif", movie.labels[t])
    assert open_movie(frames, labels=True).names == ["f0.tif", "f1.tif", "f2.tif", "f10.tif"]

    tcyx = np.zeros((3, 2, 32, 40), np.uint16)
    tifffile.imwrite(tmp_path / "tcyx.ome.tif", tcyx, metadata={"axes": "TCYX"})
    mv = open_movie(tmp_path / "tcyx.ome.tif")
    assert mv.n_frames == 3 and mv.frame(0).shape == (32, 40, 2)


def _fails(argv, capsys, *needles) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def test_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "out")
    # (--quiet: no progress bar in the captured stderr; the error line is printed regardless)
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((32, 32), np.uint16))
    _fails(["track", str(tmp_path / "one.tif"), "--out", out], capsys, "time axis", "one.tif")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    tifffile.imwrite(mixed / "a1.tif", np.zeros((32, 32), np.uint16))
    tifffile.imwrite(mixed / "a2.tif", np.zeros((32, 40), np.uint16))
    _fails(["track", str(mixed), "--out", out, "--labels", "--quiet"], capsys, "a2.tif", "shape")

    (tmp_path / "empty").mkdir()
    _fails(["track", str(tmp_path / "empty"), "--out", out], capsys, "empty", "no image")

    tifffile.imwrite(tmp_path / "float.tif", np.full((3, 16, 16), 0.5, np.float32))
    _fails(["track", str(tmp_path / "float.tif"), "--out", out, "--labels", "--quiet"], capsys,
           "float.tif", "whole numbers")

    _fails(["track-score", str(tmp_path / "empty"), str(tmp_path / "empty")], capsys,
           "not a CTC folder")

    blank = tmp_path / "blank.tif"  # a movie without cells: tracked, but nothing to score
    tifffile.imwrite(blank, np.zeros((3, 16, 16), np.uint16))
    assert main(["track", str(blank), "--out", str(tmp_path / "b"), "--labels", "--quiet"]) == 0
    assert (tmp_path / "b" / "res_track.txt").read_text() == ""
    _fails(["track-score", str(tmp_path / "b"), str(tmp_path / "b")], capsys, "no tracks")


def test_track_from_raw_frames_with_default_model(tmp_path):
    """Segment a short generated movie with the shipped model, then link and score it."""
    m = make_movie(n_frames=5, shape=(192, 192), n_cells=6, divisions=1, missing=False, seed=2)
    frames = tmp_path / "frames"
    frames.mkdir()
    for t, image in enumerate(m.images):
        tifffile.imwrite(frames / f"t{t}.tif", image)
    out = tmp_path / "res"
    assert main(["track", str(frames), "--out", str(out), "--quiet"]) == 0
    assert (out / "res_track.txt").is_file() and (out / "lineage.json").is_file()
    assert sorted(p.name for p in out.glob("mask*.tif")) == [f"mask00{t}.tif" for t in range(5)]
    labels, tracks = read_ctc(out)
    _check_ctc_consistent(labels, tracks)
    # The model finds the generated nuclei and the linker follows them through the movie.
    found, true = len(np.unique(labels[0])) - 1, len(np.unique(m.labels[0])) - 1
    assert abs(found - true) <= 1
    write_ctc(tmp_path, m.labels, m.tracks)
    assert score_tracking(out, tmp_path)["TRA"] >= 0.85


def test_rewriting_a_shorter_movie_removes_old_masks(tmp_path, movie):
    write_ctc(tmp_path, movie.labels, movie.tracks)
    short = movie.labels[:3]
    write_ctc(tmp_path, short, track_table(short, movie.parents))
    labels, tracks = read_ctc(tmp_path)
    assert labels.shape[0] == 3
    _check_ctc_consistent(labels, tracks)
