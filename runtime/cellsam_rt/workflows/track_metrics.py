"""Tracking scores against ground truth with py-ctcmetrics (the Cell Tracking Challenge metrics).

TRA and DET are the CTC's AOGM-based tracking and detection accuracies; divisions are scored by
ctc_metrics' branching-correctness counts (a division is found when the mother and both
daughters are matched, within `division_tolerance` frames), from which precision, recall and F1
(= the CTC's BC(i)) follow.

Both folders may be a flat result folder (`mask*.tif` + `res_track.txt`) or CTC ground truth
(`TRA/man_track*.tif` + `TRA/man_track.txt`): each is presented to ctc_metrics in the layout it
expects through symbolic links (copies where links are not allowed) in a temporary folder.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from ..io.ctc import ctc_layout, read_track_file


class ScoreError(ValueError):
    """The result cannot be scored (e.g. frame counts differ, or the result is not valid CTC)."""


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _stage(folder: Path, dst: Path, mask_prefix: str, track_name: str) -> int:
    """Link a CTC folder's frames and track file into `dst` under ctc_metrics' names."""
    files, txt = ctc_layout(folder)
    if not len(read_track_file(txt)):
        raise ScoreError(f"{txt}: no tracks; nothing to score")
    dst.mkdir(parents=True)
    width = max(3, len(str(len(files) - 1)))
    for n, f in enumerate(files):
        _link(f, dst / f"{mask_prefix}{n:0{width}d}.tif")
    _link(txt, dst / track_name)
    return len(files)


def score_tracking(result: "str | Path", gt: "str | Path", division_tolerance: int = 0) -> dict:
    """TRA, DET and division precision / recall / F1 of `result` against `gt` (CTC folders)."""
    from ctc_metrics.scripts.evaluate import calculate_metrics, load_data

    with tempfile.TemporaryDirectory(prefix="cellsam-track-score-") as tmp:
        tmp = Path(tmp)
        n_res = _stage(Path(result), tmp / "res", "mask", "res_track.txt")
        n_gt = _stage(Path(gt), tmp / "gt" / "TRA", "man_track", "man_track.txt")
        if n_res != n_gt:
            raise ScoreError(f"{result}: {n_res} frames, but the ground truth has {n_gt}")
        metric = f"BC({division_tolerance})"
        caught = io.StringIO()
        with warnings.catch_warnings(record=True) as warned, contextlib.redirect_stdout(caught):
            warnings.simplefilter("always")
            comp, ref, traj, segm, _, valid = load_data(str(tmp / "res"), str(tmp / "gt"),
                                                        True, False, threads=1)
            res = calculate_metrics(comp, ref, traj, segm, ["Valid", "TRA", "DET", metric],
                                    valid)
    if not valid:
        reasons = [str(w.message) for w in warned if "Empty frame" not in str(w.message)]
        raise ScoreError(f"{result}: not a valid CTC result"
                         + (f" ({reasons[0]})" if reasons else ""))
    k = division_tolerance
    tp, fp, fn = (int(res[f"{x}_div({k})"]) for x in ("tp", "fp", "fn"))
    precision = tp / (tp + fp) if tp + fp else (1.0 if not fn else 0.0)
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"TRA": float(res["TRA"]), "DET": float(res["DET"]),
            "AOGM": float(res["AOGM"]),
            "division_precision": precision, "division_recall": recall, "division_f1": f1,
            "divisions_gt": tp + fn, "divisions_found": tp + fp, "divisions_matched": tp,
            "division_tolerance": k, "frames": n_gt}
