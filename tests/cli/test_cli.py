"""The `cellsam-rt` command line: run (good and bad inputs side by side), info, export delegation."""
from __future__ import annotations

import importlib
import importlib.util
import io as _io
import json
import shutil
import sys

import cv2
import numpy as np
import pytest
import tifffile

from cellsam_rt.cli import main as cli
from cellsam_rt.backends.onnxruntime import available_providers
from cellsam_rt import model_dir as md_module

pytest.importorskip("onnx", reason="the synthetic model directory is written with onnx")
from synthetic_model import make_synthetic_model_dir  # noqa: E402


def _pipeline():
    # Skip only while the module is absent: a pipeline that fails to import must fail here.
    if importlib.util.find_spec("cellsam_rt.pipeline.segmenter") is None:
        pytest.skip("pipeline.py not written yet")
    return importlib.import_module("cellsam_rt.pipeline.segmenter")


def _image(seed, shape, dtype=np.uint16):
    """Blobs on a dark background: something cell-like for the detector to look at."""
    rng = np.random.default_rng(seed)
    img = rng.normal(50, 5, shape[:2])
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(6):
        cy, cx = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8)
        img += 400 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30)
    img = np.clip(img, 0, np.iinfo(dtype).max).astype(dtype)
    if len(shape) == 3:
        img = np.stack([img] + [np.roll(img, 3 * i, axis=1) for i in range(1, shape[2])], axis=-1)
    return img


def _run(args, capsys):
    rc = cli.main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _run_args(model, out, *extra):
    return ["--out", str(out), "--model", str(model), "--threads", "1", "--tile", "never", *extra]


def _check_outputs(out, name, shape):
    labels = tifffile.imread(out / f"{name}_labels.tif")
    assert labels.shape == shape and labels.dtype in (np.uint16, np.uint32)
    table = (out / f"{name}_cells.csv").read_text().splitlines()
    ids = set(np.unique(labels)) - {0}
    assert len(table) == (len(ids) + 1 if table else 0)  # header + one row per cell
    if ids:
        rows = table[1:]
        assert {int(r.split(",")[0]) for r in rows} == ids  # first column: the label
    return labels


# -- run ----------------------------------------------------------------------------------------

def test_run_png_with_overlay_matches_segmenter(tiny_model_dir, tmp_path, capsys):
    pipeline = _pipeline()
    rgb = _image(0, (60, 70, 3), np.uint8)
    png = tmp_path / "cells.png"
    cv2.imwrite(str(png), rgb[..., ::-1])
    out = tmp_path / "out"
    rc, stdout, stderr = _run(["run", str(png), *_run_args(tiny_model_dir, out, "--overlay")], capsys)
    assert rc == 0, stderr
    labels = _check_outputs(out, "cells", (60, 70))
    overlay = cv2.imread(str(out / "cells_overlay.png"))
    assert overlay.shape == (60, 70, 3)
    assert "cells.png" in stdout and "1 of 1 images" in stderr
    want = pipeline.Segmenter(tiny_model_dir, threads=1, tile="never").segment(rgb).labels
    np.testing.assert_array_equal(labels, want)
    # the image's files beside the run's table, ledger and table parts; no temp files left
    assert sorted(p.name for p in out.glob("cells_*")) == [
        "cells_cells.csv", "cells_labels.tif", "cells_overlay.png"]
    assert {p.name for p in out.iterdir()} == {"cells_cells.csv", "cells_labels.tif",
                                               "cells_overlay.png", "cells.parquet",
                                               "ledger.jsonl", "parts"}
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


def test_run_with_boxes_writes_cells(tiny_model_dir, tmp_path, capsys):
    """User boxes skip detection; with the IoU filter off the random decoder yields cells."""
    pipeline = _pipeline()
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["thresholds"]["iou_threshold"] = 0.0
    (model / "manifest.json").write_text(json.dumps(manifest))
    image = _image(7, (60, 70))
    np.save(tmp_path / "img.npy", image)
    (tmp_path / "boxes.csv").write_text("x0,y0,x1,y1\n5,5,25,25\n30,10,60,40\n10,35,40,58\n")
    out = tmp_path / "out"
    rc, stdout, stderr = _run(["run", str(tmp_path / "img.npy"), *_run_args(
        model, out, "--boxes", str(tmp_path / "boxes.csv"), "--overlay")], capsys)
    assert rc == 0, stderr
    labels = _check_outputs(out, "img", (60, 70))
    assert labels.max() >= 1
    boxes = np.array([[5, 5, 25, 25], [30, 10, 60, 40], [10, 35, 40, 58]], np.float32)
    want = pipeline.Segmenter(model, threads=1, tile="never").segment(image, boxes=boxes)
    np.testing.assert_array_equal(labels, want.labels)
    assert f"{want.n_cells} cells" in stdout


def test_run_two_channel_tiff(tiny_model_dir, tmp_path, capsys):
    _pipeline()
    img = np.moveaxis(_image(1, (50, 40, 2)), 2, 0)  # stored CYX
    tifffile.imwrite(tmp_path / "two.ome.tif", img, metadata={"axes": "CYX"})
    out = tmp_path / "out"
    rc, _, stderr = _run(["run", str(tmp_path / "two.ome.tif"),
                          *_run_args(tiny_model_dir, out, "--channels", "0,1", "--quiet")], capsys)
    assert rc == 0, stderr
    assert stderr == ""  # --quiet
    _check_outputs(out, "two", (50, 40))


def test_folder_with_a_corrupt_file(tiny_model_dir, tmp_path, capsys):
    _pipeline()
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", _image(2, (40, 40)))
    (folder / "b.tif").write_bytes(b"II*\x00" + b"\x07" * 30)  # corrupt
    np.save(folder / "c.npy", _image(3, (30, 50)))
    np.save(folder / "d.npy", _image(4, (32, 32, 5)))  # 5 channels and no --channels
    out = tmp_path / "out"
    rc, _, stderr = _run(["run", str(folder), str(tmp_path / "missing.png"),
                          *_run_args(tiny_model_dir, out)], capsys)
    assert rc == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, stderr
    assert errors[0].startswith(f"error: {folder / 'b.tif'}: corrupt or unreadable TIFF")
    assert errors[1].startswith(f"error: {folder / 'd.npy'}: image has 5 channels")
    assert "--channels" in errors[1]
    assert errors[2] == f"error: {tmp_path / 'missing.png'}: no such file"
    _check_outputs(out, "a", (40, 40))
    _check_outputs(out, "c", (30, 50))
    assert not list(out.glob("b_*")) and not list(out.glob("d_*"))
    assert "2 of 5 images segmented" in stderr and "3 failed" in stderr


def test_pipelined_run_matches_sequential(tiny_model_dir, tmp_path, capsys):
    """--workers 1 (read + preprocess ahead on a thread) writes what --workers 0 writes."""
    pipeline = _pipeline()
    model = tmp_path / "model"  # IoU filter off: the random decoder yields cells to compare
    shutil.copytree(tiny_model_dir, model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["thresholds"]["iou_threshold"] = 0.0
    (model / "manifest.json").write_text(json.dumps(manifest))
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", _image(10, (40, 40)))
    (folder / "b.tif").write_bytes(b"II*\x00" + b"\x07" * 30)  # corrupt
    np.save(folder / "c.npy", _image(11, (30, 50)))
    tifffile.imwrite(folder / "d.tif", _image(12, (36, 44, 2)))
    outs = {}
    for workers in ("0", "1"):
        out = outs[workers] = tmp_path / f"out{workers}"
        rc, stdout, stderr = _run(["run", str(folder), *_run_args(model, out, "--overlay"),
                                   "--workers", workers], capsys)
        assert rc == 1, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(
            f"error: {folder / 'b.tif'}: corrupt or unreadable TIFF"), stderr
        assert "3 of 4 images segmented" in stderr and "1 failed" in stderr
        # per-image lines come in input order
        assert [line.split(":")[0] for line in stdout.splitlines()] == \
            [str(folder / n) for n in ("a.tif", "c.npy", "d.tif")]
    names = sorted(str(f.relative_to(outs["0"])) for f in outs["0"].rglob("*") if f.is_file())
    assert names == sorted(str(f.relative_to(outs["1"])) for f in outs["1"].rglob("*")
                           if f.is_file())
    assert [n for n in names if n.endswith("_labels.tif")] == \
        ["a_labels.tif", "c_labels.tif", "d_labels.tif"]
    for n in names:  # every file byte-identical, the run's table and ledger included
        assert (outs["0"] / n).read_bytes() == (outs["1"] / n).read_bytes(), n
    for n in ("a", "c", "d"):
        assert tifffile.imread(outs["1"] / f"{n}_labels.tif").max() >= 1
    want = pipeline.Segmenter(model, threads=1, tile="never").segment(
        _image(12, (36, 44, 2))).labels
    np.testing.assert_array_equal(tifffile.imread(outs["1"] / "d_labels.tif"), want)


def test_same_names_do_not_overwrite(tiny_model_dir, tmp_path, capsys):
    _pipeline()
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        np.save(tmp_path / sub / "img.npy", _image(5, (24, 24)))
    out = tmp_path / "out"
    rc, _, stderr = _run(["run", str(tmp_path / "x" / "img.npy"), str(tmp_path / "y" / "img.npy"),
                          *_run_args(tiny_model_dir, out, "--quiet")], capsys)
    assert rc == 0, stderr
    assert (out / "img_labels.tif").is_file() and (out / "img-2_labels.tif").is_file()


def test_bad_model_and_backend_are_reported_once(tmp_path, capsys):
    _pipeline()
    np.save(tmp_path / "a.npy", _image(6, (24, 24)))
    rc, _, stderr = _run(["run", str(tmp_path / "a.npy"), "--out", str(tmp_path / "o"),
                          "--model", str(tmp_path / "nope")], capsys)
    assert rc == 2 and stderr.strip() == f"error: {tmp_path / 'nope'}: model directory does not exist"
    synthetic = make_synthetic_model_dir(tmp_path / "m")
    if "CUDAExecutionProvider" not in available_providers():
        rc, _, stderr = _run(["run", str(tmp_path / "a.npy"), "--out", str(tmp_path / "o"),
                              "--model", str(synthetic), "--backend", "cuda"], capsys)
        assert rc == 2 and "no CUDAExecutionProvider" in stderr


class _Tty(_io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shows_tiles_on_a_terminal(tiny_model_dir, tmp_path, monkeypatch):
    _pipeline()
    np.save(tmp_path / "big.npy", _image(8, (600, 600)))
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    rc = cli.main(["run", str(tmp_path / "big.npy"), "--out", str(tmp_path / "out"), "--model",
                   str(tiny_model_dir), "--threads", "1", "--tile", "always"])
    assert rc == 0, tty.getvalue()
    drawn = tty.getvalue()
    assert "big.npy" in drawn and "tile 1/4" in drawn and "0/1" in drawn
    assert "1 of 1 images segmented" in drawn


# -- run: checks before any model is loaded -----------------------------------------------------

def test_unwritable_out_dir_is_reported_up_front(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    np.save(tmp_path / "a.npy", np.ones((8, 8), np.uint8))
    rc, _, stderr = _run(["run", str(tmp_path / "a.npy"), "--out", str(blocker / "sub"),
                          "--model", str(tmp_path / "no-model-needed")], capsys)
    assert rc == 2
    assert stderr.startswith(f"error: output folder {blocker / 'sub'}: cannot write there")
    assert len(stderr.strip().splitlines()) == 1


def test_boxes_need_a_single_input(tmp_path, capsys):
    rc, _, stderr = _run(["run", "a.png", "b.png", "--out", str(tmp_path), "--boxes", "b.csv"],
                         capsys)
    assert rc == 2 and "--boxes gives boxes for one image" in stderr


@pytest.mark.parametrize("bad", [["--channels", "0,1,2"],
                                 ["--channels", "-1"], ["--threads", "0"],
                                 ["--bbox-threshold", "2"], ["--plane", "Z3"],
                                 ["--backend", "gpu"], ["--workers", "-1"]])
def test_bad_options_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "x.png", "--out", "o", *bad])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


# -- info, help, export -------------------------------------------------------------------------

def test_info_on_a_model_dir(tmp_path, capsys):
    model = make_synthetic_model_dir(tmp_path / "m", precisions=("fp32", "fp16"))
    rc, stdout, _ = _run(["info", str(model)], capsys)
    assert rc == 0
    assert "synthetic" in stdout and "3x64x64; embeddings 8x4x4; masks 16x16" in stdout
    assert "has_model_cp False" in stdout and "decoder.fp16.onnx" in stdout
    assert "KiB" in stdout and "CPUExecutionProvider" in stdout
    rc, stdout, _ = _run(["info", str(model), "--json"], capsys)
    assert rc == 0 and json.loads(stdout)["name"] == "synthetic"


def test_info_lists_the_cpu_graphs(tiny_model_dir, capsys):
    rc, stdout, _ = _run(["info", str(tiny_model_dir)], capsys)
    assert rc == 0
    lines = [ln for ln in stdout.splitlines() if "(cpu backend)" in ln]
    assert len(lines) == 2 and "encoder.cpu.onnx" in lines[0] and "cellfinder.cpu.onnx" in lines[1]


def test_info_without_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(md_module, "DEFAULT_MODEL_DIR", tmp_path / "default")
    rc, stdout, stderr = _run(["info"], capsys)
    assert rc == 2
    assert "default model is not installed" in stderr and "cellsam-rt export" in stderr
    assert "CPUExecutionProvider" in stdout  # the software report still helps


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in ("run", "info", "export"):
        assert f"    {name}" in text
    for cmd in cli.all_commands():  # a command appears only once its module exists
        assert (f"    {cmd.name}" in text) == cli.listed(cmd)


def test_export_delegates_to_the_exporter(capsys):
    pytest.importorskip("cellsam_export.export_cli")
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "--help"])
    assert info.value.code == 0
    assert "usage: cellsam-rt export" in capsys.readouterr().out


def test_unavailable_lazy_command(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", [cli.Command(
        "frobnicate", "cellsam_rt.no_such_module", "x", always_listed=True)])
    rc, _, stderr = _run(["frobnicate"], capsys)
    assert rc == 2 and "not available in this installation" in stderr


def test_output_piped_into_a_closed_reader_exits_quietly():
    """`cellsam-rt info default | head -1`: no BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-u", "-m", "cellsam_rt.cli", "info", "default"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("model")
    proc.stdout.close()  # the reader goes away while info is still probing and printing
    err = proc.stderr.read()
    assert proc.wait(timeout=120) in (0, 141)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_run_with_spots_assigns_them_to_the_cells_found(tiny_model_dir, tmp_path, capsys):
    """`run IMAGE --spots TABLE`: segment, then every spot gets the label under it."""
    import anndata
    import pandas as pd

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["thresholds"]["iou_threshold"] = 0.0  # the random decoder then yields cells
    (model / "manifest.json").write_text(json.dumps(manifest))
    tifffile.imwrite(tmp_path / "a.tif", _image(10, (40, 40)))
    rng = np.random.default_rng(0)
    spots = pd.DataFrame({"x": rng.uniform(0, 39, 200), "y": rng.uniform(0, 39, 200),
                          "gene": rng.choice(["Actb", "Gapdh"], 200)})
    spots.to_csv(tmp_path / "spots.csv", index=False)
    out = tmp_path / "out"
    rc, stdout, stderr = _run(["run", str(tmp_path / "a.tif"), *_run_args(model, out),
                               "--spots", str(tmp_path / "spots.csv")], capsys)
    assert rc == 0, stderr
    labels = tifffile.imread(out / "a_labels.tif")
    assert labels.max() >= 1
    got = pd.read_csv(out / "a_spots.csv")
    rows = np.floor(spots["y"].to_numpy() + 0.5).astype(int)
    cols = np.floor(spots["x"].to_numpy() + 0.5).astype(int)
    np.testing.assert_array_equal(got["cell"].to_numpy(), labels[rows, cols])
    counts = anndata.read_h5ad(out / "a_cells.h5ad")
    assert int(counts.X.sum()) == int((labels[rows, cols] > 0).sum())
    assert "a.tif" in stdout


def test_run_spots_needs_one_image_file(tmp_path, capsys):
    rc, _, stderr = _run(["run", "a.png", "b.png", "--out", str(tmp_path), "--spots", "s.csv"],
                         capsys)
    assert rc == 2 and "--spots assigns spots to one image file" in stderr
