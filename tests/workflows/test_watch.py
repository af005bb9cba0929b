"""`cellsam-rt watch`: images dropped one by one (one written in two parts) are segmented once
each, only when complete; --exit-when-idle ends with 0; a restart resumes; SIGTERM exits cleanly."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import tifffile
from screening_helpers import env, nuclei

SEG = ["--tile", "never", "--threads", "2", "--bbox-threshold", "0.6"]  # few cells: fast
WATCH = ["--poll", "--poll-interval", "0.3", *SEG]


def _watch(inbox, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "cellsam_rt.cli", "watch", str(inbox),
                             "--out", str(out), *WATCH, *extra], env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _done(out):
    path = out / "ledger.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln)["key"] for ln in path.read_text().splitlines()
            if json.loads(ln).get("event") == "done"]


def _drop_images(inbox, images):
    """Write a.tif, b.npy, c.tif in two parts with a pause (longer than two polls), d.tif."""
    tifffile.imwrite(inbox / "a.tif", images[0])
    time.sleep(0.4)
    np.save(inbox / "b.npy", images[1])
    staging = inbox.parent / "c.tif"
    tifffile.imwrite(staging, images[2])
    data = staging.read_bytes()
    with open(inbox / "c.tif", "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        time.sleep(1.2)
        fh.write(data[len(data) // 2:])
    time.sleep(0.3)
    tifffile.imwrite(inbox / "d.tif", images[3])


def test_watch_segments_each_complete_image_once(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    images = [nuclei(128, i)[..., 0] for i in (5, 6, 9, 10)]
    proc = _watch(inbox, out, "--exit-when-idle", "3")
    writer = threading.Thread(target=_drop_images, args=(inbox, images))
    writer.start()
    stdout, stderr = proc.communicate(timeout=240)
    writer.join()
    assert proc.returncode == 0, stderr
    done = _done(out)
    names = ["a.tif", "b.npy", "c.tif", "d.tif"]
    assert sorted(done) == sorted(str((inbox / n).resolve()) for n in names), done
    assert len(done) == len(set(done))  # each exactly once
    lines = [ln for ln in stdout.splitlines() if "cells ->" in ln]
    assert len(lines) == 4, stdout
    assert "4 of 4 images segmented" in stderr
    # c.tif was segmented whole: its labels equal a plain run on the finished file.
    ref = tmp_path / "ref"
    from cellsam_rt.cli import main as cli

    assert cli.main(["run", str(inbox / "c.tif"), "--out", str(ref), "--quiet", *SEG]) == 0
    assert (ref / "c_labels.tif").read_bytes() == (out / "c_labels.tif").read_bytes()
    assert tifffile.imread(out / "c_labels.tif").max() > 0
    assert (out / "cells.parquet").is_file()

    # A restart goes through the same ledger: nothing is segmented twice.
    proc = _watch(inbox, out, "--exit-when-idle", "1")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "0 of 4 images segmented" in stderr and "4 skipped" in stderr, stderr
    assert len(_done(out)) == 4


def test_sigterm_finishes_and_exits_cleanly(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    proc = _watch(inbox, out)
    tifffile.imwrite(inbox / "one.tif", nuclei(128, 12)[..., 0])
    t0 = time.monotonic()
    while not _done(out):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 120
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "1 of 1 images segmented" in stderr and "stopped" in stderr, stderr
    assert (out / "cells.parquet").is_file()  # the table is written on the way out


def test_watch_a_growing_plate_in_place(tmp_path):
    """DIR is a plate: a well added later is segmented once its field is complete; labels and
    the table go into the plate."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_plate_metadata, write_well_metadata
    from screening_helpers import make_plate, write_ngff_image

    plate = make_plate(tmp_path / "grow.zarr", "0.4", rows=("A",), cols=("1",), fields=("0",))
    proc = subprocess.Popen([sys.executable, "-m", "cellsam_rt.cli", "watch", str(plate), *WATCH,
                             "--channels", "DAPI", "--exit-when-idle", "3"], env=env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    root = zarr.open_group(str(plate), mode="a")
    write_plate_metadata(root, ["A"], ["1", "2"], ["A/1", "A/2"], fmt=FormatV04())
    time.sleep(0.7)  # the plate lists A/2 before the well exists: not complete yet
    well = root.require_group("A").require_group("2")
    write_well_metadata(well, ["0"], fmt=FormatV04())
    write_ngff_image(well.require_group("0"), nuclei(128, 3), "0.4")
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert "2 of 2 images segmented" in stderr, stderr
    done = _done(plate / "tables")
    assert sorted(done) == [f"{plate.resolve()}/A/1/0", f"{plate.resolve()}/A/2/0"]
    for well_path in ("A/1/0", "A/2/0"):
        assert (plate / well_path / "labels" / "cells" / ".zattrs").is_file()
    import pandas as pd

    table = pd.read_parquet(plate / "tables" / "cells.parquet")
    assert set(zip(table["row"], table["column"])) == {("A", "1"), ("A", "2")}
