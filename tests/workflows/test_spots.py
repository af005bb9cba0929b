"""Spot assignment: pixel conventions, expansion, counts against a slow reference, outputs, CLI."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from cellsam_rt.cli.main import main
from cellsam_rt.io import ImageReadError
from cellsam_rt.io.label_images import read_label_image
from cellsam_rt.workflows.spots import (
    SpotsError,
    assign_spots,
    assign_spots_for_run,
    expand_labels,
    render_density,
    write_spot_outputs,
)

anndata = pytest.importorskip("anndata")


def two_cells() -> np.ndarray:
    """6 x 8 image: cell 1 at rows 1-2, cols 1-2; cell 2 touching it at cols 3-4; cell 7 alone."""
    lab = np.zeros((6, 8), np.uint16)
    lab[1:3, 1:3] = 1
    lab[1:3, 3:5] = 2
    lab[4, 6] = 7
    return lab


def table(xy, genes=None, **extra) -> pd.DataFrame:
    xy = np.asarray(xy, float)
    genes = genes if genes is not None else ["g"] * len(xy)
    return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "gene": genes, **extra})


# -- conventions --------------------------------------------------------------------------------

def test_pixel_borders_belong_to_the_pixel_below_and_right():
    lab = two_cells()
    # x = 2.5 is the border between column 2 (cell 1) and column 3 (cell 2): column 3.
    xy = [(2.49, 1), (2.5, 1), (0.5, 1.0), (0.4999, 1.0), (4.5, 2), (6, 3.5), (6, 4.49)]
    res = assign_spots(lab, table(xy), "t.csv")
    assert res.spots["cell"].tolist() == [1, 2, 1, 0, 0, 7, 7]
    assert res.summary["outside"] == 0 and res.summary["background"] == 2


def test_outside_counted_separately_from_background():
    lab = two_cells()  # 8 wide, 6 high: x covers [-0.5, 7.5), y [-0.5, 5.5)
    inside = [(1, 1)] * 60 + [(0, 0)] * 10 + [(-0.5, -0.5), (7.49, 5.49)]
    outside = [(-0.51, 0), (7.5, 0), (0, 5.5)]
    res = assign_spots(lab, table(inside + outside), "t.csv", allow_outside=True)
    s = res.summary
    assert (s["spots"], s["assigned"], s["background"], s["outside"]) == (75, 60, 12, 3)
    assert res.spots["cell"].tolist()[-3:] == [0, 0, 0]
    # 3 of 75 outside is below the 5% refusal threshold; 4 of 20 is not.
    assign_spots(lab, table(inside + outside), "t.csv")
    with pytest.raises(SpotsError, match="--pixel-size"):
        assign_spots(lab, table([(1, 1)] * 16 + outside + [(100, 100)]), "t.csv")


def test_microns_use_pixel_size_and_origin():
    lab = two_cells()
    # 0.5 µm per pixel: (x, y) = (1.5 µm, 0.5 µm) is pixel (col 3, row 1) = cell 2.
    res = assign_spots(lab, table([(1.5, 0.5), (0.5, 0.5), (3.0, 2.0)]), "t.csv", pixel_size=0.5)
    assert res.spots["cell"].tolist() == [2, 1, 7]
    # An origin (the centre of pixel (0, 0) in µm) is subtracted first.
    res = assign_spots(lab, table([(11.5, 20.5)]), "t.csv", pixel_size=0.5,
                       origin_um=(20.0, 10.0))
    assert res.spots["cell"].tolist() == [2]
    assert res.obs["area_um2"].tolist() == [1.0, 1.0, 0.25]


def test_expansion_grows_into_background_but_never_into_a_neighbour():
    lab = np.zeros((5, 14), np.uint16)
    lab[1:4, 1:4] = 1  # touching cell 2
    lab[1:4, 4:7] = 2
    lab[1:4, 11:13] = 3  # gap of columns 7..10 between cells 2 and 3
    xy = [(4, 2), (3, 2), (0, 2), (7, 2), (8, 2), (9, 2), (10, 2), (13, 2), (5, 0)]
    plain = assign_spots(lab, table(xy), "t.csv").spots["cell"].tolist()
    assert plain == [2, 1, 0, 0, 0, 0, 0, 0, 0]
    grown = assign_spots(lab, table(xy), "t.csv", expand=2).spots["cell"].tolist()
    # Cells 1 and 2 keep their own pixels; the gap splits between its two nearest cells.
    assert grown == [2, 1, 1, 2, 2, 3, 3, 3, 2]
    um = assign_spots(lab, table(np.asarray(xy) * 0.5), "t.csv", pixel_size=0.5, expand=1.0,
                      expand_units="um").spots["cell"].tolist()
    assert um == grown


def test_tiled_expansion_matches_whole_image():
    from skimage.segmentation import expand_labels as whole

    rng = np.random.default_rng(3)
    lab = np.zeros((150, 170), np.int32)
    for i, (y, x) in enumerate(rng.integers(0, 150, (60, 2))):
        lab[y:y + rng.integers(1, 6), x:x + rng.integers(1, 6)] = i + 1
    for distance in (1.5, 7):
        np.testing.assert_array_equal(expand_labels(lab, distance, tile=32), whole(lab, distance))


def test_random_against_slow_per_spot_count():
    from skimage.measure import regionprops_table

    rng = np.random.default_rng(0)
    h, w = 40, 57
    lab = np.zeros((h, w), np.uint32)
    for _ in range(30):  # rectangles with sparse ids (gaps in the numbering)
        y, x = rng.integers(0, h), rng.integers(0, w)
        lab[y:y + rng.integers(2, 9), x:x + rng.integers(2, 9)] = rng.integers(1, 500)
    lab[0, 0] = 1000  # a one-pixel cell no spot may hit
    n = 3000
    xs, ys = rng.uniform(-1, w, n), rng.uniform(-1, h, n)
    xs[:50] = np.round(xs[:50]) - 0.5  # exactly on pixel borders
    genes = rng.choice(["Actb", "Gapdh", "Cd3e", "Ptprc", "Zz"], n)
    keep = (np.floor(xs + 0.5) != 0) | (np.floor(ys + 0.5) != 0)  # no spot on cell 1000
    xs, ys, genes = xs[keep], ys[keep], genes[keep]
    res = assign_spots(lab, table(np.c_[xs, ys], list(genes)), "t.csv", allow_outside=True)

    slow: dict[tuple[int, str], int] = {}
    cells, outside = [], 0
    for x, y, g in zip(xs, ys, genes):
        r, c = math.floor(y + 0.5), math.floor(x + 0.5)
        if not (0 <= r < h and 0 <= c < w):
            outside += 1
            cells.append(0)
            continue
        cell = int(lab[r, c])
        cells.append(cell)
        if cell:
            slow[(cell, str(g))] = slow.get((cell, str(g)), 0) + 1
    assert res.spots["cell"].tolist() == cells
    assert res.summary["outside"] == outside
    dense = res.counts.toarray()
    ids = res.obs["label"].tolist()
    assert ids == sorted(set(np.unique(lab).tolist()) - {0})
    assert res.genes == sorted(set(genes))
    for i, cell in enumerate(ids):
        for j, gene in enumerate(res.genes):
            assert dense[i, j] == slow.get((cell, gene), 0)
    assert res.summary["cells_without_spots"] == int((dense.sum(axis=1) == 0).sum()) >= 1
    props = pd.DataFrame(regionprops_table(lab.astype(np.int32),
                                           properties=("label", "area", "centroid")))
    np.testing.assert_array_equal(res.obs["area"], props["area"])
    np.testing.assert_allclose(res.obs["centroid_y"], props["centroid-0"])
    np.testing.assert_allclose(res.obs["centroid_x"], props["centroid-1"])


def test_huge_sparse_label_ids():
    lab = np.zeros((4, 5), np.uint32)
    lab[0:2, 0:2] = 4_000_000_000
    lab[3, 4] = 3
    res = assign_spots(lab, table([(0, 0), (1, 1), (4, 3), (4, 0)], ["a", "b", "a", "a"]),
                       "t.csv")
    assert res.obs["label"].tolist() == [3, 4_000_000_000]
    assert res.obs["area"].tolist() == [1, 4]
    assert res.counts.toarray().tolist() == [[1, 0], [1, 1]]
    assert res.spots["cell"].tolist() == [4_000_000_000, 4_000_000_000, 3, 0]


# -- outputs ------------------------------------------------------------------------------------

def test_h5ad_matches_counts_csv_and_keeps_empty_cells(tmp_path):
    lab = two_cells()
    lab[5, 0] = 9  # a cell without spots
    rng = np.random.default_rng(1)
    xy = np.c_[rng.uniform(0, 7.4, 400), rng.uniform(0, 4.4, 400)]  # none in row 5 (cell 9)
    res = assign_spots(lab, table(xy, list(rng.choice(["b", "a", "c"], 400)), fov=7), "t.csv")
    paths = write_spot_outputs(res, tmp_path, "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_cells.h5ad", "s_counts.csv",
                                                         "s_spots.csv"]
    assert len(paths) == 3
    adata = anndata.read_h5ad(tmp_path / "s_cells.h5ad")
    csv = pd.read_csv(tmp_path / "s_counts.csv", index_col="cell")
    assert adata.obs_names.tolist() == ["1", "2", "7", "9"] == [str(i) for i in csv.index]
    assert adata.var_names.tolist() == ["a", "b", "c"] == csv.columns.tolist()
    np.testing.assert_array_equal(adata.X.toarray(), csv.to_numpy())
    assert adata.obs["label"].tolist() == [1, 2, 7, 9]
    assert adata.obs.loc["9", "n_spots"] == 0 and csv.loc[9].sum() == 0
    np.testing.assert_allclose(adata.obsm["spatial"], [[1.5, 1.5], [3.5, 1.5], [6, 4], [0, 5]])
    spots = pd.read_csv(tmp_path / "s_spots.csv")
    assert spots.columns.tolist() == ["x", "y", "gene", "fov", "cell"]
    # every assigned spot is counted once, in its cell's row and its gene's column
    per_cell = spots[spots.cell > 0].groupby(["cell", "gene"]).size().unstack(fill_value=0)
    np.testing.assert_array_equal(per_cell.to_numpy(), csv.loc[per_cell.index].to_numpy())


def test_assign_spots_for_run_parquet(tmp_path):
    spots = tmp_path / "tx.parquet"
    table([(1, 1), (3, 1), (0, 0)], ["a", "b", "a"]).to_parquet(spots)
    out = tmp_path / "out"
    out.mkdir()
    summary = assign_spots_for_run(two_cells(), spots, out, "img", expand=1.5)
    assert (summary["assigned"], summary["background"], summary["cells"]) == (3, 0, 3)
    assert summary["warnings"] == []
    assert sorted(p.name for p in out.iterdir()) == ["img_cells.h5ad", "img_counts.csv",
                                                    "img_spots.parquet"]
    assert pd.read_parquet(out / "img_spots.parquet")["cell"].tolist() == [1, 2, 1]


def test_few_bad_rows_are_dropped_with_a_warning(tmp_path, capsys):
    lab_path = tmp_path / "lab.tif"
    tifffile.imwrite(lab_path, two_cells())
    rows = table([(1, 1)] * 200 + [(3, 1)] * 100, ["a"] * 300)
    rows.loc[5, "x"] = np.nan
    rows["y"] = rows["y"].astype(object)
    rows.loc[7, "y"] = "n/a"
    rows.loc[9, "gene"] = None
    rows.to_csv(tmp_path / "s.csv", index=False)
    assert main(["spots", str(lab_path), str(tmp_path / "s.csv"), "--out",
                 str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {tmp_path / 's.csv'}: 3 of 300 rows dropped (no usable x, y or gene)"]
    out = pd.read_csv(tmp_path / "o" / "s_spots.csv")
    assert len(out) == 297 and out["cell"].value_counts().to_dict() == {1: 197, 2: 100}


# -- bad input ----------------------------------------------------------------------------------

def _bad_cases(tmp_path: Path):
    lab = tmp_path / "lab.tif"
    tifffile.imwrite(lab, two_cells())
    good = table([(1, 1)] * 30)
    cases = {}

    def case(name, frame, labels=lab, extra=()):
        path = tmp_path / f"{name}.csv"
        if frame is not None:
            frame.to_csv(path, index=False)
        cases[name] = ([str(labels), str(path), *extra])

    case("missing_column", good.drop(columns="gene"))
    case("text_coordinates", good.assign(x="left"))
    case("mostly_nan", good.assign(x=[np.nan] * 20 + [1.0] * 10))
    case("microns_as_pixels", table([(1, 1)] * 10 + [(40, 40)] * 20))
    case("no_such_table", None)
    float_lab = tmp_path / "float.tif"
    tifffile.imwrite(float_lab, two_cells().astype(np.float32))
    case("float_labels", good, labels=float_lab)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([two_cells()] * 3))
    case("stack_labels", good, labels=stack)
    case("expand_um_without_pixel_size", good, extra=("--expand", "2", "--expand-units", "um"))
    case("auto_without_metadata", good, extra=("--pixel-size", "auto"))
    case("one_path", good)
    cases["one_path"] = cases["one_path"][1:]
    return cases


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, capsys):
    expected = {"missing_column": "missing column(s) gene", "text_coordinates": "no numbers",
                "mostly_nan": "20 of 30 rows", "microns_as_pixels": "--pixel-size",
                "no_such_table": "no such file", "float_labels": "not a label image",
                "stack_labels": "must be 2-D", "expand_um_without_pixel_size": "--pixel-size",
                "auto_without_metadata": "no pixel size", "one_path": "expected LABELS SPOTS"}
    for name, argv in _bad_cases(tmp_path).items():
        out = tmp_path / f"out_{name}"
        assert main(["spots", *argv, "--out", str(out), "--quiet"]) == 2, name
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, captured.err)
        assert expected[name] in lines[0], (name, lines[0])
        assert not out.exists() or not any(out.iterdir()), name


def test_label_image_readers(tmp_path):
    lab = two_cells()
    tifffile.imwrite(tmp_path / "a.ome.tif", lab[None],
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25,
                               "PhysicalSizeXUnit": "nm", "PhysicalSizeYUnit": "nm"})
    img = read_label_image(tmp_path / "a.ome.tif")
    np.testing.assert_array_equal(img.labels, lab)
    assert img.pixel_size == pytest.approx(0.25e-3)
    tifffile.imwrite(tmp_path / "ij.tif", lab, imagej=True, resolution=(2.0, 2.0),
                     metadata={"unit": "um"})
    assert read_label_image(tmp_path / "ij.tif").pixel_size == pytest.approx(0.5)
    (tmp_path / "ij.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="must be TIFF"):
        read_label_image(tmp_path / "ij.png")


def test_ome_zarr_labels_with_scale_give_microns(tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    from ome_zarr.writer import write_image, write_labels

    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    write_image(np.zeros((6, 8), np.uint8), root, axes="yx", scale={"y": 0.5, "x": 0.5},
                axes_units={"y": "micrometer", "x": "micrometer"}, scale_factors=[])
    write_labels(two_cells(), root, name="cells", axes="yx", scale={"y": 0.5, "x": 0.5},
                 axes_units={"y": "micrometer", "x": "micrometer"}, scale_factors=[])
    img = read_label_image(tmp_path / "img.ome.zarr" / "labels" / "cells")
    np.testing.assert_array_equal(img.labels, two_cells())
    assert img.pixel_size == pytest.approx(0.5)
    # The image group with one label means that label.
    assert read_label_image(tmp_path / "img.ome.zarr").labels.max() == 7
    table([(1.5, 0.5), (0.5, 0.5)] * 10).to_csv(tmp_path / "s.csv", index=False)
    assert main(["spots", str(tmp_path / "img.ome.zarr" / "labels" / "cells"),
                 str(tmp_path / "s.csv"), "--out", str(tmp_path / "o"), "--pixel-size", "auto",
                 "--quiet"]) == 0
    assert pd.read_csv(tmp_path / "o" / "s_spots.csv")["cell"].tolist() == [2, 1] * 10


def test_cli_end_to_end(tmp_path, capsys):
    lab_path = tmp_path / "lab.ome.tif"
    tifffile.imwrite(lab_path, two_cells(), metadata={"axes": "YX", "PhysicalSizeX": 0.5,
                                                      "PhysicalSizeY": 0.5})
    table([(0.5, 0.5), (1.5, 0.5), (3, 2), (2, 2)], ["a", "b", "a", "a"]).to_csv(
        tmp_path / "tx.csv", index=False)
    assert main(["spots", str(lab_path), str(tmp_path / "tx.csv"), "--out", str(tmp_path / "o"),
                 "--pixel-size", "auto", "--no-counts-csv"]) == 0
    out = capsys.readouterr().out
    assert "4 spots: 3 in 3 cells, 1 in background, 0 outside" in out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["tx_cells.h5ad",
                                                                 "tx_spots.csv"]
    adata = anndata.read_h5ad(tmp_path / "o" / "tx_cells.h5ad")
    assert adata.X.toarray().tolist() == [[1, 0], [0, 1], [1, 0]]


# -- density ------------------------------------------------------------------------------------

def test_render_density_peaks_where_spots_cluster():
    rng = np.random.default_rng(2)
    cluster = rng.normal((30.0, 12.0), 1.0, (500, 2))  # (x, y) around x=30, y=12 (units)
    noise = rng.uniform(0, 40, (100, 2))
    pts = np.vstack([cluster, noise])
    img = render_density(pts[:, 0], pts[:, 1], pixel_size=2.0, sigma=1.0)
    assert img.dtype == np.float32
    assert img.shape == (int(np.floor(pts[:, 1].max() / 2 + 0.5)) + 1,
                         int(np.floor(pts[:, 0].max() / 2 + 0.5)) + 1)
    assert np.unravel_index(np.argmax(img), img.shape) == (6, 15)
    assert img.sum() == pytest.approx(600, rel=0.02)  # blur keeps the mass (little at edges)
    raw = render_density(pts[:, 0], pts[:, 1], shape=(5, 5), pixel_size=2.0, sigma=0)
    assert raw.sum() == ((np.floor(pts / 2 + 0.5) < 5).all(axis=1)).sum()


def test_segment_density_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    pts = []
    for cx in (15, 40, 65):
        for cy in (15, 40):
            r, t = 6 * np.sqrt(rng.uniform(0, 1, 400)), rng.uniform(0, 2 * np.pi, 400)
            pts.append(np.c_[cx + r * np.cos(t), cy + r * np.sin(t)])
    pts = np.vstack(pts)
    table(pts, list(rng.choice(["A", "B"], len(pts)))).to_parquet(tmp_path / "d.parquet")
    assert main(["spots", "--segment-density", str(tmp_path / "d.parquet"), "--out",
                 str(tmp_path / "o"), "--density-pixel-size", "0.5", "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["d_cells.h5ad", "d_counts.csv", "d_density.tif", "d_labels.tif",
                     "d_spots.parquet"]
    labels = tifffile.imread(tmp_path / "o" / "d_labels.tif")
    density = tifffile.imread(tmp_path / "o" / "d_density.tif")
    assert labels.shape == density.shape == (int(pts[:, 1].max() * 2 + 0.5) + 1,
                                             int(pts[:, 0].max() * 2 + 0.5) + 1)
    assert labels.max() > 0 and density.max() > 0
    # Each spot carries the label under it in the density image's pixels (0.5 units each).
    spots = pd.read_parquet(tmp_path / "o" / "d_spots.parquet")
    rows = np.floor(spots["y"].to_numpy() / 0.5 + 0.5).astype(int)
    cols = np.floor(spots["x"].to_numpy() / 0.5 + 0.5).astype(int)
    np.testing.assert_array_equal(spots["cell"], labels[rows, cols])
    adata = anndata.read_h5ad(tmp_path / "o" / "d_cells.h5ad")
    assert adata.obs["label"].tolist() == sorted(set(np.unique(labels).tolist()) - {0})
    assert adata.X.sum() == (spots["cell"] > 0).sum()


def test_segment_density_bad_inputs_are_one_line(tmp_path, capsys):
    table([(3, 3)] * 20).to_csv(tmp_path / "d.csv", index=False)
    argv = ["spots", "--segment-density", str(tmp_path / "d.csv"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--model", str(tmp_path / "no_model")]) == 2
    assert main([*argv, "--density-pixel-size", "0.0001"]) == 2  # 30001 x 30001 pixels
    assert main(["spots", str(tmp_path / "x.tif"), *argv[1:]]) == 2  # LABELS as well
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert "no_model" in lines[0] and "raise --density-pixel-size" in lines[1]
    assert "takes only the spots table" in lines[2]
    assert not any((tmp_path / "o").iterdir())


def test_ngff_04_translation_is_the_origin(tmp_path):
    """An NGFF 0.4 (zarr v2) labels group whose level 0 is scaled and translated."""
    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(str(tmp_path / "cells.zarr"), mode="w", zarr_format=2)
    group.create_array("0", data=two_cells()[None], chunks=(1, 6, 8))
    axes = [{"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "nanometer"},
            {"name": "x", "type": "space", "unit": "nanometer"}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 500.0, 500.0]},
            {"type": "translation", "translation": [0.0, 20000.0, 10000.0]}]}]}]
    img = read_label_image(tmp_path / "cells.zarr")
    assert img.labels.shape == (6, 8)
    assert img.pixel_size == pytest.approx(0.5) and img.origin_um == pytest.approx((20.0, 10.0))
    table([(11.5, 20.5), (10.5, 20.5), (13.0, 22.0)] * 10).to_csv(tmp_path / "s.csv", index=False)
    summary = assign_spots_for_run(img.labels, tmp_path / "s.csv", tmp_path, "s",
                                   pixel_size="auto", image_path=tmp_path / "cells.zarr")
    assert summary["outside"] == 0
    assert pd.read_csv(tmp_path / "s_spots.csv")["cell"].tolist() == [2, 1, 7] * 10


def test_run_spots_options_and_call(tmp_path):
    """The options and the call `cellsam-rt run --spots` uses, on labels held in memory."""
    import argparse

    from cellsam_rt.cli.spots import add_run_spots_arguments, assign_run_spots

    image = tmp_path / "img.ome.tif"
    tifffile.imwrite(image, np.zeros((6, 8), np.uint8),
                     metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    table([(1.5, 0.5), (0.5, 0.5)] * 10).to_csv(tmp_path / "tx.csv", index=False)
    parser = argparse.ArgumentParser()
    add_run_spots_arguments(parser)
    args = parser.parse_args(["--spots", str(tmp_path / "tx.csv"), "--spots-pixel-size", "auto",
                              "--spots-expand", "0.5", "--spots-expand-units", "um"])
    summary = assign_run_spots(args, two_cells(), image, tmp_path, "img")
    assert (summary["assigned"], summary["cells"]) == (20, 3)
    assert sorted(Path(p).name for p in summary["outputs"]) == [
        "img_cells.h5ad", "img_counts.csv", "img_spots.csv"]
    assert anndata.read_h5ad(tmp_path / "img_cells.h5ad").uns["cellsam_rt"]["expand_px"] == 1.0
