"""`cellsam-rt run --scheduler`: Dask runs give the single-process run's outputs, survive a killed
worker process, and fail fast on an unreachable scheduler (real LocalClusters, loopback only)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import tifffile

from screening_helpers import cli, env, nuclei, temp_files

FAST = ["--threads", "1", "--bbox-threshold", "0.6"]
N_IMAGES = 12


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist_in")
    for i in range(N_IMAGES):
        tifffile.imwrite(folder / f"img{i:02d}.tif", nuclei(128, i)[..., 0])
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The single-process run of the same command."""
    out = tmp_path_factory.mktemp("dist_ref")
    r = cli("run", images, "--out", out, *FAST, "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def done_records(out: Path) -> list[dict]:
    lines = (out / "ledger.jsonl").read_text().splitlines()
    return [rec for rec in map(json.loads, lines) if rec["event"] == "done"]


def assert_same_outputs(out: Path, ref: Path) -> None:
    """Label TIFFs and CSVs byte-identical, the same table, one ledger record per image."""
    names = sorted(p.name for p in ref.glob("*_labels.tif"))
    assert len(names) == N_IMAGES
    assert sorted(p.name for p in out.glob("*_labels.tif")) == names
    for name in names + sorted(p.name for p in ref.glob("*_cells.csv")):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    got, want = pd.read_parquet(out / "cells.parquet"), pd.read_parquet(ref / "cells.parquet")
    assert len(want) > 0
    pd.testing.assert_frame_equal(got, want)
    assert not got.duplicated(["file", "label"]).any()
    keys = Counter(rec["key"] for rec in done_records(out))
    assert len(keys) == N_IMAGES and set(keys.values()) == {1}
    assert keys.keys() == {rec["key"] for rec in done_records(ref)}
    assert temp_files(out) == []


def test_local_cluster_matches_single_process(images, reference, tmp_path):
    out = tmp_path / "out"
    r = cli("run", images, "--out", out, *FAST, "--scheduler", "local:2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert_same_outputs(out, reference)


def test_killed_worker_process_reruns_its_tasks(images, reference, tmp_path):
    from distributed import Client, LocalCluster

    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        before = client.run(os.getpid)
        proc = subprocess.Popen([sys.executable, "-m", "cellsam_rt.cli", "run", str(images),
                                 "--out", str(out), *FAST, "--scheduler",
                                 cluster.scheduler_address, "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env())
        try:
            victim = None
            deadline = time.monotonic() + 60
            while victim is None and time.monotonic() < deadline and proc.poll() is None:
                busy = [w for w, keys in client.processing().items() if keys]
                victim = busy[0] if busy else None
                time.sleep(0.02)
            assert victim is not None, "no worker ever held a task"
            os.kill(before[victim], signal.SIGKILL)  # mid-task: it is loading or segmenting
            stdout, stderr = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        after = client.run(os.getpid)
        assert before[victim] not in after.values()  # the killed process really went away
        assert proc.returncode == 0, stderr
        assert_same_outputs(out, reference)

        # A rerun on the same cluster skips every finished image, exactly as a single-process
        # run does; a broken input is one error line (exit 1), not retried into a crash.
        bad = tmp_path / "broken.tif"
        bad.write_bytes(b"not a TIFF file")
        again = cli("run", images, bad, "--out", out, *FAST, "--scheduler",
                    cluster.scheduler_address)
    assert again.returncode == 1, again.stderr
    assert "0 of 13 images segmented" in again.stderr and "12 skipped" in again.stderr
    assert "1 failed" in again.stderr
    errors = [ln for ln in again.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "broken.tif" in errors[0], again.stderr
    assert "Traceback" not in again.stderr
    assert len(done_records(out)) == N_IMAGES


def test_unreachable_scheduler_is_one_line_and_exit_2(images, tmp_path):
    started = time.monotonic()
    r = cli("run", images, "--out", tmp_path / "out", "--scheduler", "tcp://127.0.0.1:9",
            timeout=60)
    elapsed = time.monotonic() - started
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:9: ")
    assert elapsed < 15
    assert not (tmp_path / "out" / "ledger.jsonl").exists()


def test_bad_local_worker_count_is_a_usage_error(images, tmp_path):
    r = cli("run", images, "--out", tmp_path / "out", "--scheduler", "local:0", timeout=60)
    assert r.returncode == 2
    assert "local:N with N >= 1" in r.stderr


def test_worker_engine_loads_the_model_once_per_options():
    from cellsam_rt.workflows.batch import BatchOptions
    from cellsam_rt.workflows.distributed import worker_engine

    opts = BatchOptions(segmenter={"threads": 1, "bbox_threshold": 0.6})
    first, _ = worker_engine(opts, "m")
    assert worker_engine(BatchOptions(segmenter={"threads": 1, "bbox_threshold": 0.6}),
                         "m")[0] is first
    other, _ = worker_engine(BatchOptions(segmenter={"threads": 1, "bbox_threshold": 0.5}), "m")
    assert other is not first and other.segmenter is not first.segmenter
    assert other.segmenter.bbox_threshold == 0.5


def test_scheduler_spec_accepts_addresses_and_local_counts():
    from cellsam_rt.workflows.distributed import check_scheduler

    for ok in ("localhost:8786", "tcp://127.0.0.1:8786", "local:1", "local:4"):
        assert check_scheduler(ok) == ok
    for bad in ("local:0", "local:x", "local:", " "):
        with pytest.raises(ValueError):
            check_scheduler(bad)
