"""Resumable runs: kill -9 mid-run, rerun, and the outputs equal an uninterrupted run's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import tifffile
from screening_helpers import env, make_plate, nuclei, temp_files

from cellsam_rt.cli import main as cli

N_IMAGES = 20
FAST = ["--threads", "2", "--bbox-threshold", "0.6"]  # few cells: fast


def _done_keys(ledger):
    if not ledger.exists():
        return []
    keys = []
    for line in ledger.read_bytes().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if rec.get("event") == "done":
            keys.append(rec["key"])
    return keys


def _kill_when(proc, ledger, n_done, timeout=240):
    """SIGKILL the run once `n_done` images are finished (or fail if it ends first)."""
    t0 = time.monotonic()
    while len(_done_keys(ledger)) < n_done:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "run too slow"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _same_outputs(ref, got):
    names = sorted(p.name for p in ref.iterdir() if p.name.endswith((".tif", ".csv")))
    assert names == sorted(p.name for p in got.iterdir() if p.name.endswith((".tif", ".csv")))
    assert len(names) == 2 * N_IMAGES
    for n in names:
        assert (ref / n).read_bytes() == (got / n).read_bytes(), n
    a, b = pd.read_parquet(ref / "cells.parquet"), pd.read_parquet(got / "cells.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert not b.duplicated(["file", "label"]).any()
    assert len(b) > N_IMAGES  # objects were found
    assert sorted(p.name for p in (ref / "parts").iterdir()) == \
        sorted(p.name for p in (got / "parts").iterdir())


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(N_IMAGES):
        tifffile.imwrite(src / f"img{i:02d}.tif", nuclei(128, i)[..., 0])
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert cli.main(["run", str(src), "--out", str(ref), "--quiet", *FAST]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "cellsam_rt.cli", "run", str(src), "--out",
                             str(out), "--quiet", *FAST], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(proc, out / "ledger.jsonl", n_done=4)
    finished = len(set(_done_keys(out / "ledger.jsonl")))
    assert 4 <= finished < N_IMAGES

    capsys.readouterr()
    assert cli.main(["run", str(src), "--out", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert f"{finished} images already segmented" in err, err
    assert f"{N_IMAGES - finished} of {N_IMAGES} images segmented" in err, err
    _same_outputs(ref, out)
    assert temp_files(out) == []
    done = _done_keys(out / "ledger.jsonl")
    assert len(done) == len(set(done)) == N_IMAGES  # each image finished exactly once

    # A changed input is redone, the others are skipped.
    img = src / "img03.tif"
    tifffile.imwrite(img, nuclei(128, 30)[..., 0])
    assert cli.main(["run", str(src), "--out", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert f"1 of {N_IMAGES} images segmented" in err and f"{N_IMAGES - 1} skipped" in err, err
    np.testing.assert_array_equal(
        tifffile.imread(out / "img03_labels.tif").shape, (128, 128))
    assert not (tifffile.imread(out / "img03_labels.tif")
                == tifffile.imread(ref / "img03_labels.tif")).all()


def test_plate_kill_9_then_rerun_gives_the_same_labels(tmp_path, capsys):
    """In-store zarr labels: a killed run leaves no .partial files and the rerun's labels equal
    a clean run's, byte for byte."""
    import zarr

    plates = [make_plate(tmp_path / f"{name}.zarr", "0.5", rows=("A",), cols=("1", "2", "3"),
                         fields=("0",)) for name in ("clean", "killed")]
    assert cli.main(["run", str(plates[0]), "--quiet", "--channels", "DAPI", *FAST]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "cellsam_rt.cli", "run", str(plates[1]),
                             "--quiet", "--channels", "DAPI", *FAST], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _kill_when(proc, plates[1] / "tables" / "ledger.jsonl", n_done=1)
    capsys.readouterr()
    assert cli.main(["run", str(plates[1]), "--channels", "DAPI", *FAST]) == 0
    assert "already segmented" in capsys.readouterr().err
    assert temp_files(plates[1]) == []
    for well in ("A/1/0", "A/2/0", "A/3/0"):
        a = zarr.open_array(str(plates[0] / well / "labels/cells/s0"), mode="r")[:]
        b = zarr.open_array(str(plates[1] / well / "labels/cells/s0"), mode="r")[:]
        np.testing.assert_array_equal(a, b)
    a = pd.read_parquet(plates[0] / "tables/cells.parquet")
    b = pd.read_parquet(plates[1] / "tables/cells.parquet")
    pd.testing.assert_frame_equal(a.drop(columns="plate"), b.drop(columns="plate"))


def test_ledger_drops_a_torn_line_and_tells_what_changed(tmp_path):
    from cellsam_rt.workflows.ledger import Ledger, file_fingerprint

    img = tmp_path / "a.tif"
    tifffile.imwrite(img, nuclei(128, 0)[..., 0])
    (tmp_path / "a_labels.tif").write_bytes(b"x")
    fp, opts = file_fingerprint(img), {"tile": "never", "channels": [0]}
    ledger = Ledger(tmp_path / "ledger.jsonl")
    assert ledger.status("a", fp, "m1", opts) == "new"
    ledger.start("a")
    ledger.finish("a", fp, "m1", opts, ["a_labels.tif"])
    with open(tmp_path / "ledger.jsonl", "ab") as fh:  # a kill in the middle of an append
        fh.write(b'{"event":"done","key":"b","inp')
    again = Ledger(tmp_path / "ledger.jsonl")
    assert (tmp_path / "ledger.jsonl").read_bytes().endswith(b"}\n")  # torn tail cut off
    assert list(again.done) == ["a"] and again.owns("a") and not again.owns("b")
    assert again.status("a", fp, "m1", dict(opts)) == "done"
    assert again.status("a", fp, "m2", opts) == "model"
    assert again.status("a", fp, "m1", {**opts, "tile": "auto"}) == "options"
    # An option added to cellsam-rt after the run: at its automatic setting nothing is redone.
    assert again.status("a", fp, "m1", {**opts, "denoise": "auto"}) == "done"
    assert again.status("a", fp, "m1", {**opts, "denoise": "gaussian"}) == "options"
    assert again.status("a", fp, "m1", {"tile": "never"}) == "options"  # one dropped
    tifffile.imwrite(img, nuclei(128, 1)[..., 0])
    assert again.status("a", file_fingerprint(img), "m1", opts) == "input"
    (tmp_path / "a_labels.tif").unlink()
    assert again.status("a", fp, "m1", opts) == "new"  # an output was deleted


def test_every_segmenter_option_that_changes_labels_is_in_the_ledger_options():
    import argparse

    from cellsam_rt.cli import run

    def recorded(*flags):
        parser = argparse.ArgumentParser()
        run.add_arguments(parser)
        return run.batch_options(parser.parse_args(["x.tif", *flags])).result_options()

    base = recorded()
    for flags in (["--polarity", "dark"], ["--outline", "model"], ["--denoise", "gaussian"],
                  ["--augment", "flips"], ["--diameter", "20"],
                  ["--decoder", "full"], ["--tile", "never"], ["--bbox-threshold", "0.5"]):
        assert recorded(*flags) != base, flags  # a resumed run with it redoes the images
    assert recorded("--threads", "1") == base  # how fast, not what comes out
