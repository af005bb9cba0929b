"""`cellsam-rt run` on OME-Zarr: HCS plates (NGFF 0.4 and 0.5), single images, bad plates.

Plates are written with ome-zarr-py's writer; labels are read back with ome_zarr.reader."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("ome_zarr")
import zarr  # noqa: E402
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Reader  # noqa: E402
from screening_helpers import (PIXEL_UM, make_image_store, make_plate,  # noqa: E402
                               temp_files)

from cellsam_rt.cli import main as cli  # noqa: E402

FAST = ["--threads", "2", "--bbox-threshold", "0.6"]  # few cells: fast


def _run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _label_node(path):
    """The ome_zarr.reader node of a label image (the reader also yields its parent image)."""
    nodes = [n for n in Reader(parse_url(str(path)))() if str(n.zarr.path).rstrip("/")
             == str(path).rstrip("/")]
    assert len(nodes) == 1, path
    return nodes[0]


def _image_node(path):
    return next(iter(Reader(parse_url(str(path)))()))


def _scales(node):
    return [t["scale"] for level in node.metadata["coordinateTransformations"]
            for t in level if t["type"] == "scale"]


def _check_labels(image_path, label_path):
    """labels/cells: readable, level-0 spatial shape and scale equal to the image's; c = 1."""
    img, lab = _image_node(image_path), _label_node(label_path)
    assert "Label" in [type(s).__name__ for s in lab.specs]
    assert [a["name"] for a in lab.metadata["axes"]] == [a["name"] for a in img.metadata["axes"]]
    assert lab.data[0].shape[1:] == img.data[0].shape[1:] and lab.data[0].shape[0] == 1
    assert _scales(lab)[0] == _scales(img)[0]
    assert len(lab.data) == len(img.data)  # same pyramid depth, nearest-neighbour levels
    level0 = np.asarray(lab.data[0])[0]
    level1 = np.asarray(lab.data[1])[0]
    assert level1.shape == ((level0.shape[0] + 1) // 2, (level0.shape[1] + 1) // 2)
    assert set(np.unique(level1)) <= set(np.unique(level0))  # nearest: no blended label values
    return level0


def test_plate_in_store_labels_and_table(tmp_path, capsys, monkeypatch):
    plate = make_plate(tmp_path / "plate.zarr", "0.4")  # 2 rows x 3 columns x 2 fields
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, out, err = _run(capsys, "run", plate, "--channels", "DAPI", *FAST)
    assert rc == 0, err
    assert "12 of 12 images segmented" in err
    assert list(cwd.iterdir()) == []  # nothing in the working directory
    table = pd.read_parquet(plate / "tables" / "cells.parquet")
    assert (plate / "tables" / "ledger.jsonl").is_file()
    expected_rows = []
    for r in "AB":
        for c in "123":
            for f in "01":
                labels = _check_labels(plate / r / c / f, plate / r / c / f / "labels" / "cells")
                ids = sorted(set(np.unique(labels).tolist()) - {0})
                rows = table[(table["row"] == r) & (table["column"] == c)
                             & (table["field"] == f)]
                assert sorted(rows["label"].tolist()) == ids, (r, c, f)
                for lab_id, area in zip(rows["label"], rows["area"]):
                    assert area == int((labels == lab_id).sum())
                expected_rows += ids
    assert len(table) == len(expected_rows) > 12  # one row per object, objects were found
    assert set(table["plate"]) == {"plate"} and table["file"].isna().all()
    np.testing.assert_allclose(table["area_um2"], table["area"] * PIXEL_UM ** 2)
    for col in ("centroid_y", "centroid_x", "bbox_min_row", "bbox_max_col", "score",
                "mean_intensity_DAPI", "mean_intensity_CellMask"):
        assert col in table and table[col].notna().all(), col
    # The labels group lists the label once (ome-zarr's writer would append it again).
    assert json.loads((plate / "A/1/0/labels/.zattrs").read_text())["labels"] == ["cells"]

    rc, _, err = _run(capsys, "run", plate, "--channels", "DAPI", *FAST)
    assert rc == 0 and "12 images already segmented" in err and "0 of 12" in err, err
    assert temp_files(plate) == []


def test_single_image_and_ngff05_plate_into_mirror(tmp_path, capsys):
    single = make_image_store(tmp_path / "single.zarr", "0.5", seed=20)
    plate = make_plate(tmp_path / "p5.zarr", "0.5", rows=("C",), cols=("4",), fields=("0", "1"))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "run", single, plate, "--out", out, "--channels", "0",
                      "--anndata", *FAST)
    assert rc == 0, err
    assert not (single / "labels").exists() and not (plate / "C/4/0/labels").exists()
    _check_labels(single, out / "single.zarr" / "labels" / "cells")
    for f in "01":
        _check_labels(plate / "C/4" / f, out / "p5.zarr" / "C/4" / f / "labels" / "cells")
    meta = json.loads((out / "p5.zarr/C/4/0/labels/cells/zarr.json").read_text())
    assert meta["attributes"]["ome"]["version"] == "0.5"
    assert meta["attributes"]["ome"]["image-label"]["source"] == {"image": "../../"}
    table = pd.read_parquet(out / "cells.parquet")
    assert set(table["file"].dropna()) == {str(single.resolve())}
    assert set(table["field"].dropna()) == {"0", "1"} and set(table["row"].dropna()) == {"C"}
    import anndata

    adata = anndata.read_h5ad(out / "cells.h5ad")
    assert adata.n_obs == len(table) and list(adata.var_names) == ["DAPI", "CellMask"]
    np.testing.assert_allclose(adata.X[:, 0], table["mean_intensity_DAPI"], rtol=1e-6)

    # --level 1: labels at the level's resolution, placed where that level is (scale, offset).
    rc, _, err = _run(capsys, "run", single, "--level", "1", "--label-name", "half",
                      "--channels", "DAPI", *FAST)
    assert rc == 0, err
    img, lab = _image_node(single), _label_node(single / "labels" / "half")
    assert lab.data[0].shape[1:] == img.data[1].shape[1:]
    assert lab.metadata["coordinateTransformations"][0] == \
        img.metadata["coordinateTransformations"][1]


def test_bad_plates_report_one_line_each(tmp_path, capsys):
    plate = make_plate(tmp_path / "bad.zarr", "0.4", rows=("A",), cols=("1", "2"),
                       fields=("0", "1"))
    shutil.rmtree(plate / "A/1/1")                      # a field the well lists is missing
    chunk = next(p for p in (plate / "A/2/0/s0").rglob("*") if p.is_file()
                 and not p.name.startswith("."))
    chunk.write_bytes(b"\x00garbage" * 7)              # a corrupt chunk
    odd = make_image_store(tmp_path / "odd.zarr", "0.4")
    attrs = json.loads((odd / ".zattrs").read_text())
    attrs["multiscales"][0]["version"] = "0.9"         # an unknown NGFF version
    (odd / ".zattrs").write_text(json.dumps(attrs))
    taken = make_image_store(tmp_path / "taken.zarr", "0.4", seed=5)
    from ome_zarr.writer import write_labels         # someone else's labels/cells

    write_labels(np.ones((1, 128, 128), np.uint16), zarr.open_group(str(taken), mode="a"),
                 name="cells", axes="cyx", scaler=None, scale_factors=[])

    rc, _, err = _run(capsys, "run", plate, odd, taken, "--channels", "DAPI", *FAST)
    assert rc == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 4, err
    assert any(f"{plate}/A/1/1" in e and "missing" in e for e in errors), errors
    assert any(f"{plate}/A/2/0" in e and "cannot read pixels" in e for e in errors), errors
    assert any(str(odd) in e and "unsupported NGFF version 0.9" in e for e in errors), errors
    assert any(f"{taken}/labels/cells" in e and "--overwrite" in e for e in errors), errors
    assert "2 of 6 images segmented" in err and "4 failed" in err
    for good in ("A/1/0", "A/2/1"):
        _check_labels(plate / good, plate / good / "labels" / "cells")
    assert np.asarray(_label_node(taken / "labels/cells").data[0]).max() == 1  # untouched

    rc, _, err = _run(capsys, "run", taken, "--overwrite", "--channels", "0", *FAST)
    assert rc == 0, err
    relabelled = _check_labels(taken, taken / "labels" / "cells")
    assert (relabelled == 0).any()  # segmented now, no longer the all-ones label image
