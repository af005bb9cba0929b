"""Smoke tests for `cellsam-rt bench` on the tiny model (no timing assertions: shared CPUs)."""
from __future__ import annotations

import json

import pytest

from cellsam_rt.cli.main import main

STAGES = ("read", "preprocess", "encoder", "cellfinder", "detect", "decoder", "paste",
          "postprocess", "write", "total")


def _bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--repeats", "2", "--warmup", "0", "--size", "256", "--json", str(out),
               "--quiet", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_bench_writes_json_with_every_stage(tiny_model_dir, tmp_path, capsys):
    rec = _bench(tmp_path, "--model", str(tiny_model_dir), "--n-boxes", "6")
    assert rec["schema"] == "cellsam-rt-bench/1"
    for stage in STAGES:
        s = rec["stages"][stage]
        assert s["n"] == 2 and len(s["samples_s"]) == 2
        assert 0 <= s["median_s"] <= s["p95_s"] + 1e-12
    assert rec["config"]["boxes"]["count"] == 6
    assert rec["config"]["cellfinder_timed"] is True
    assert rec["config"]["precision"] == "fp32"
    assert rec["machine"]["logical_cores"] >= 1 and rec["machine"]["model"]
    for pkg in ("numpy", "onnxruntime", "opencv", "cellsam-rt"):
        assert rec["software"][pkg]
    assert "torch" not in rec["software"]  # only when the reference ran
    assert rec["throughput"]["images_per_s"] > 0
    assert rec["throughput"]["decoder_boxes_per_s"] > 0
    assert rec["memory"]["peak_rss_mib"] > 0
    table = capsys.readouterr().out
    assert "median s" in table and "images/s" in table


def test_bench_detection_and_skip_cellfinder(tiny_model_dir, tmp_path):
    rec = _bench(tmp_path, "--model", str(tiny_model_dir), "--detect")
    assert rec["config"]["boxes"]["source"] == "detections"
    assert "cellfinder" in rec["stages"] and "decoder_boxes_per_s" in rec["throughput"]
    rec = _bench(tmp_path, "--model", str(tiny_model_dir), "--n-boxes", "3",
                 "--skip-cellfinder")
    assert "cellfinder" not in rec["stages"]
    assert rec["config"]["cellfinder_timed"] is False


def test_bench_against_reference(tiny_model_dir, tmp_path):
    testing = pytest.importorskip("cellsam_export.testing")
    # Same config and seed as the fixture's model directory: the same weights.
    ckpt = testing.make_random_checkpoint(tmp_path / "tiny.pt", config="tiny", seed=0)
    rec = _bench(tmp_path, "--model", str(tiny_model_dir), "--n-boxes", "4",
                 "--reference", str(ckpt), "--reference-repeats", "1")
    ref = rec["reference"]
    assert "torch" in rec["software"]
    for group in ("preprocess", "encoder", "cellfinder", "masks", "postprocess", "segment"):
        row = ref["comparison"][group]
        assert row["ours_s"] >= 0 and row["reference_s"] > 0
    assert ref["agreement"]["labels_equal"] in (True, False)


def test_bench_rejects_bad_repeats(tiny_model_dir, capsys):
    assert main(["bench", "--model", str(tiny_model_dir), "--repeats", "0"]) == 2
    assert "repeats" in capsys.readouterr().err


def test_bench_throughput_sequential_and_pipelined(tiny_model_dir, tmp_path, capsys):
    rec = _bench(tmp_path, "--model", str(tiny_model_dir), "--n-boxes", "3", "--throughput",
                 "--throughput-images", "3", "--repeats", "1")
    t = rec["throughput"]
    assert t["throughput_images"] == 3 and t["workers"] == 1
    assert t["sequential_images_per_s"] > 0 and t["pipelined_images_per_s"] > 0
    assert "pipelined" in capsys.readouterr().out
