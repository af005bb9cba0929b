"""Images larger than memory: blockwise segmentation into OME-Zarr label images (CLI, resume, TIFF
input, Dask cluster) and the lazy array API, on discs planted across block borders and corners."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from large_image_helpers import (BLOCK, BLOCK_ARGS, OVERLAP, centres, check_cells, discs,
                                 read_labels, write_ome_zarr)
from screening_helpers import cli, env, temp_files


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, np.ndarray]:
    return discs()


@pytest.fixture(scope="module")
def store(planted, tmp_path_factory) -> Path:
    return write_ome_zarr(tmp_path_factory.mktemp("large_in") / "big.zarr", planted[0])


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    """`run --blockwise` of the OME-Zarr image into a mirrored store under --out."""
    out = tmp_path_factory.mktemp("large_out")
    r = cli("run", store, "--out", out, *BLOCK_ARGS)
    assert r.returncode == 0, r.stderr
    assert f"{len(centres())} cells" in r.stdout and "4 blocks" in r.stdout, r.stdout
    return out


def test_cells_across_block_borders_are_whole_and_unique(reference, planted):
    labels = read_labels(reference / "big.zarr" / "labels" / "cells")
    check_cells(labels, planted[1])
    assert labels.dtype == np.uint16
    level1 = np.asarray(zarr.open_array(str(reference / "big.zarr/labels/cells/1"), mode="r"))
    assert np.array_equal(level1, labels[::2, ::2])
    cells = pd.read_parquet(reference / "cells.parquet")
    assert cells["label"].tolist() == list(range(1, int(labels.max()) + 1))
    area = np.bincount(labels.ravel())[1:]
    assert cells["area"].tolist() == area.tolist()
    ys, xs = np.nonzero(labels == 7)
    row = cells[cells["label"] == 7].iloc[0]
    assert row["centroid_y"] == pytest.approx(ys.mean()) and row["bbox_max_col"] == xs.max() + 1
    assert not (reference / "blocks").exists() and temp_files(reference) == []


def test_rerun_skips_the_finished_image(reference, store):
    stamp = (reference / "big.zarr/labels/cells/0/.zarray").stat().st_mtime_ns
    r = cli("run", store, "--out", reference, *BLOCK_ARGS)
    assert r.returncode == 0, r.stderr
    assert "already segmented" in r.stderr
    assert (reference / "big.zarr/labels/cells/0/.zarray").stat().st_mtime_ns == stamp


def test_lazy_array_api_gives_the_same_labels(reference, store):
    import dask.array as da

    from cellsam_rt.workflows.blockwise import segment_array

    image = da.from_zarr(str(store / "s0"))
    labels = segment_array(image, block=BLOCK, overlap=OVERLAP, threads=1)
    assert isinstance(labels, da.Array) and labels.shape == image.shape
    assert labels.dtype == np.uint32
    want = np.asarray(zarr.open_array(str(reference / "big.zarr/labels/cells/0"), mode="r"))
    assert np.array_equal(labels.compute(scheduler="threads"), want)


def test_tiled_tiff_input_writes_an_ome_zarr_label_store(reference, planted, tmp_path):
    tif = tmp_path / "big.tif"
    tifffile.imwrite(tif, planted[0], tile=(256, 256))
    out = tmp_path / "out"
    r = cli("run", tif, "--out", out, *BLOCK_ARGS)
    assert r.returncode == 0, r.stderr
    labels = read_labels(out / "big.zarr" / "labels" / "cells")
    want = np.asarray(zarr.open_array(str(reference / "big.zarr/labels/cells/0"), mode="r"))
    assert np.array_equal(labels, want)
    assert len(pd.read_parquet(out / "cells.parquet")) == int(want.max())


def test_killed_run_leaves_no_label_image_and_resumes(planted, tmp_path):
    """In place (no --out) in an NGFF 0.5 store: SIGKILL after the first block, then rerun."""
    store = write_ome_zarr(tmp_path / "v05.zarr", planted[0], version="0.5")
    proc = subprocess.Popen([sys.executable, "-m", "cellsam_rt.cli", "run", str(store),
                             *BLOCK_ARGS, "--quiet"], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((store / "tables").glob("blocks/*/*.npz")):
            assert proc.poll() is None and time.monotonic() < deadline, "no block finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (store / "labels" / "cells").exists()
    kept = list((store / "tables").glob("blocks/*/*.npz"))
    assert kept
    r = cli("run", store, *BLOCK_ARGS)
    assert r.returncode == 0, r.stderr
    labels = read_labels(store / "labels" / "cells")
    check_cells(labels, planted[1])
    meta = zarr.open_group(str(store / "labels"), mode="r").attrs.asdict()
    assert meta["ome"]["labels"] == ["cells"]
    assert (store / "tables" / "cells.parquet").is_file()
    assert not (store / "tables" / "blocks").exists() and temp_files(store) == []


def test_block_files_of_an_interrupted_run_are_reused(planted, tmp_path):
    from cellsam_rt.io import label_store
    from cellsam_rt.io.lazy_images import open_lazy
    from cellsam_rt.workflows.blockwise import BlockPlan
    from cellsam_rt.workflows.large_image import BlockJob, segment_large, segment_task

    tif = tmp_path / "img.tif"
    tifffile.imwrite(tif, planted[0][:, :500], tile=(128, 128))
    lazy = open_lazy(tif)
    job = BlockJob(lazy, BlockPlan(lazy.height, lazy.width, BLOCK, OVERLAP), tmp_path / "b",
                   {"model": "default", "threads": 1})
    job.folder.mkdir()
    segment_task(job, 1, 1)
    marker = job.block_file(1, 1).stat().st_mtime_ns
    layout = label_store.LabelLayout("yx", lazy.height, lazy.width, levels=1)
    seen = []

    class Recording:
        def map(self, fn, calls):
            for args in calls:
                if fn is segment_task:
                    seen.append(job.block_file(*args[1:]).is_file())
                yield fn(*args)

    res = segment_large(job, tmp_path / "out.zarr", "", "cells", layout, Recording())
    assert seen.count(True) == 1 and len(seen) == 4  # block (1, 1) was not segmented again
    assert res.n_cells == len(np.unique(planted[1][:, :500])) - 1
    assert marker and not job.folder.exists()
    labels = read_labels(tmp_path / "out.zarr" / "labels" / "cells")
    assert labels.shape == (lazy.height, lazy.width) and labels.max() == res.n_cells


def test_plate_fields_go_blockwise_into_the_mirrored_store(tmp_path):
    from screening_helpers import make_plate

    plate = make_plate(tmp_path / "plate.zarr", rows=("A",), cols=("1",), fields=("0", "1"),
                       size=256)
    out = tmp_path / "out"
    r = cli("run", plate, "--out", out, "--blockwise", "--block", "128", "--block-overlap", "32",
            "--channels", "DAPI", "--threads", "1")
    assert r.returncode == 0, r.stderr
    cells = pd.read_parquet(out / "cells.parquet")
    for field in ("0", "1"):
        labels = read_labels(out / "plate.zarr" / "A" / "1" / field / "labels" / "cells")
        assert labels.shape == (1, 256, 256)  # the image's axes, cyx
        rows = cells[cells["field"] == field]
        assert np.unique(labels[labels > 0]).tolist() == rows["label"].tolist()
        assert len(rows) > 10 and (rows["mean_intensity_DAPI"] > 0).all()
    meta = zarr.open_group(str(out / "plate.zarr"), mode="r").attrs.asdict()
    assert "plate" in meta  # the mirror carries the plate's metadata


def test_not_an_image_is_one_line(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("not a TIFF\n")
    r = cli("run", bad, "--out", tmp_path / "out", *BLOCK_ARGS)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "notes.tif" in lines[0] and "TIFF" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_open_lazy_errors_name_the_path(tmp_path):
    from cellsam_rt.errors import CellsamRtError
    from cellsam_rt.io.lazy_images import open_lazy

    text = tmp_path / "table.csv"
    text.write_text("a,b\n")
    for path, words in ((text, "not an image"), (tmp_path / "missing.zarr", "no such")):
        with pytest.raises(CellsamRtError) as err:
            open_lazy(path)
        assert str(path) in str(err.value) and words in str(err.value)
        assert "\n" not in str(err.value)


def test_unreachable_scheduler_is_one_line(store, tmp_path):
    started = time.monotonic()
    r = cli("run", store, "--out", tmp_path / "out", *BLOCK_ARGS, "--scheduler",
            "tcp://127.0.0.1:9")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: cannot reach the Dask scheduler at "
                                       "tcp://127.0.0.1:9")
    assert len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out" / "big.zarr" / "labels").exists()


@pytest.mark.slow
def test_local_cluster_gives_the_single_process_labels(reference, store, tmp_path):
    out = tmp_path / "out"
    r = cli("run", store, "--out", out, *BLOCK_ARGS, "--scheduler", "local:2", timeout=300)
    assert r.returncode == 0, r.stderr
    got = read_labels(out / "big.zarr" / "labels" / "cells")
    want = np.asarray(zarr.open_array(str(reference / "big.zarr/labels/cells/0"), mode="r"))
    assert np.array_equal(got, want)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "cells.parquet"),
                                  pd.read_parquet(reference / "cells.parquet"))


@pytest.mark.slow
def test_lazy_array_api_on_a_local_cluster(reference, store):
    import dask.array as da
    from distributed import Client, LocalCluster

    from cellsam_rt.workflows.blockwise import segment_array

    want = np.asarray(zarr.open_array(str(reference / "big.zarr/labels/cells/0"), mode="r"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        labels = segment_array(da.from_zarr(str(store / "s0")), block=BLOCK, overlap=OVERLAP,
                               threads=1)
        got = client.compute(labels).result()
    assert np.array_equal(got, want)
