"""The napari plugin in a real (headless, Xvfb) napari viewer with the shipped default model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

napari = pytest.importorskip("napari", reason="napari is not installed (cellsam-rt[napari])")
npe2 = pytest.importorskip("npe2")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")
if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
    # pytest-xvfb sets DISPLAY when it has started Xvfb; Qt's offscreen platform has no OpenGL.
    pytest.skip("no X display for napari's OpenGL canvas (install Xvfb and pytest-xvfb)",
                allow_module_level=True)

import cellsam_rt.napari  # noqa: E402
from cellsam_rt.napari.engine import ModelOptions, get_engine  # noqa: E402
from cellsam_rt.napari.sample import SAMPLE_PATH  # noqa: E402

pytestmark = pytest.mark.napari

MANIFEST = Path(cellsam_rt.napari.__file__).with_name("napari.yaml")
PLUGIN = "cellsam-rt"
WAIT_MS = 60_000


@pytest.fixture
def plugin():
    """The plugin's manifest registered with npe2 (as the installed entry point would do)."""
    pm = npe2.PluginManager.instance()
    if PLUGIN not in pm._manifests:
        pm.register(npe2.PluginManifest.from_file(MANIFEST))
    return pm


@pytest.fixture
def viewer_widget(make_napari_viewer, plugin):
    """A viewer holding the plugin's sample and the docked Segment widget."""
    viewer = make_napari_viewer(show=True)  # shown (on Xvfb): the canvas renders
    viewer.open_sample(PLUGIN, "nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment cells")
    return viewer, widget


def _segment(qtbot, widget):
    done = widget.jobs_done
    widget.start_segment()
    qtbot.waitUntil(lambda: widget.jobs_done > done, timeout=WAIT_MS)


def _check_features(layer):
    ids = np.unique(layer.data)
    ids = ids[ids > 0]
    feats = layer.features
    assert len(ids) > 0
    assert len(feats) == len(ids)
    assert sorted(feats["index"].tolist()) == ids.tolist()
    assert (feats["index"] == feats["label"]).all()
    for lab in ids[:5]:  # the area column counts the label's pixels
        row = feats[feats["index"] == lab].iloc[0]
        assert row["area"] == int((layer.data == lab).sum())


def test_napari_widget_segments_sample_into_labels_with_features(qtbot, viewer_widget,
                                                                  tmp_path):
    viewer, widget = viewer_widget
    _segment(qtbot, widget)
    layer = viewer.layers["nuclei cells"]
    assert isinstance(layer, napari.layers.Labels)
    assert layer.data.shape == viewer.layers["nuclei"].data.shape
    _check_features(layer)
    assert np.isfinite(layer.features["score"]).all()
    assert "mean_intensity_0" in layer.features
    # Hovering a cell shows its table row.
    lab = int(layer.features["index"].iloc[0])
    ys, xs = np.nonzero(layer.data == lab)
    status = layer.get_status((ys[0], xs[0]), world=True)
    assert "area:" in str(status["coordinates"])
    # Saved as a run: the table's intensities are recomputed from the widget's image.
    written = layer.save(str(tmp_path / "nuclei_labels.tif"), plugin=PLUGIN)
    assert len(written) == 2
    table = pd.read_csv(tmp_path / "nuclei_cells.csv")
    assert np.allclose(table["mean_intensity_0"], layer.features["mean_intensity_0"])
    assert np.allclose(table["score"], layer.features["score"])
    # The canvas shows something.
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot[..., :3].astype(np.float64).var() > 0
    # The outline choice reaches the model: the default model reads its masks against the image.
    assert widget._options().outline == "auto"
    widget.outline.value = "model"
    assert get_engine(widget._options()).segmenter.outline == "model"
    # So does the noise choice.
    assert widget._options().denoise == "auto"
    widget.denoise.value = "gaussian"
    assert get_engine(widget._options()).segmenter.denoise == "gaussian"
    # And the views choice.
    assert widget._options().augment == "auto"
    widget.augment.value = "flips"
    assert get_engine(widget._options()).segmenter.augment == "flips"


def test_napari_three_boxes_add_three_cells_and_keep_others(qtbot, viewer_widget):
    viewer, widget = viewer_widget
    _segment(qtbot, widget)
    layer = viewer.layers["nuclei cells"]
    # Delete three cells, then prompt them back with boxes around them.
    feats = layer.features
    # Three compact cells (a mask can be ragged; a box prompt gives a compact one).
    fill = feats["area"] / ((feats["bbox_max_row"] - feats["bbox_min_row"])
                            * (feats["bbox_max_col"] - feats["bbox_min_col"]))
    compact = feats[(fill > 0.6) & (feats["area"] > 100)].sort_values("area", ascending=False)
    gone = compact.iloc[:3]
    assert len(gone) == 3
    data = np.array(layer.data)
    data[np.isin(data, gone["index"].to_numpy())] = 0
    layer.data = data
    layer.features = feats[~feats["index"].isin(gone["index"])].reset_index(drop=True)
    before = data.copy()
    top = int(before.max())
    engine = get_engine(ModelOptions())
    encoder_runs = engine.backend.encoder_runs

    shapes = viewer.add_shapes(name="boxes")
    widget.shapes.value = shapes
    done = widget.jobs_done
    rects = [np.array([[r.bbox_min_row - 2, r.bbox_min_col - 2],
                       [r.bbox_max_row + 1, r.bbox_max_col + 1]], np.float64)
             for r in gone.itertuples()]
    shapes.add_rectangles(rects)  # emits "added" once: the widget segments these boxes
    qtbot.waitUntil(lambda: widget.jobs_done > done and not widget.busy, timeout=WAIT_MS)

    after = np.asarray(layer.data)
    new_ids = sorted(set(np.unique(after).tolist()) - set(np.unique(before).tolist()))
    assert new_ids == [top + 1, top + 2, top + 3]
    kept = before > 0
    assert np.array_equal(after[kept], before[kept])      # no existing cell changed
    for r, lab in zip(gone.itertuples(), new_ids):         # each new cell sits in its box
        ys, xs = np.nonzero(after == lab)
        assert r.bbox_min_row - 3 <= ys.mean() <= r.bbox_max_row + 2
    _check_features(layer)
    assert engine.backend.encoder_runs == encoder_runs    # the image embedding was reused
    # A second click changes nothing: those boxes are done.
    widget.start_boxes()
    assert not widget.busy
    # The box cells are one undoable edit.
    layer.undo()
    assert np.array_equal(layer.data, before)


def test_napari_cancel_leaves_no_layer_and_viewer_responsive(qtbot, make_napari_viewer, plugin):
    viewer = make_napari_viewer()
    base = tifffile.imread(SAMPLE_PATH)
    # Distinct planes (no kept embedding helps), several seconds of work in all.
    stack = np.stack([np.rot90(base, k % 4) if k < 4 else np.rot90(base.T, k % 4)
                      for k in range(8)])
    viewer.add_image(stack, name="movie")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment cells")
    widget.scope.value = "all planes"
    engine = get_engine(ModelOptions())
    runs, encoded = engine.backend.decoder_runs, engine.backend.encoder_runs
    done = widget.jobs_done
    widget.start_segment()
    qtbot.waitUntil(lambda: engine.backend.decoder_runs > runs, timeout=WAIT_MS)
    ticks = []
    from qtpy.QtCore import QTimer
    QTimer.singleShot(0, lambda: ticks.append(1))  # the event loop runs during the job
    qtbot.waitUntil(lambda: bool(ticks), timeout=5_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.jobs_done > done, timeout=WAIT_MS)
    assert not widget.busy
    assert "movie cells" not in viewer.layers
    assert widget.status.value == "cancelled"
    assert engine.backend.encoder_runs - encoded < 8  # stopped before every plane was encoded
    assert widget.run_button.enabled
    viewer.add_points(np.array([[0, 10, 10]]))  # still usable
    assert len(viewer.layers) == 2


def test_napari_stack_all_planes_then_one_plane_again(qtbot, make_napari_viewer, plugin):
    viewer = make_napari_viewer()
    base = tifffile.imread(SAMPLE_PATH)
    viewer.add_image(np.stack([base, np.rot90(base)]), name="movie")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment cells")
    widget.scope.value = "all planes"
    _segment(qtbot, widget)
    layer = viewer.layers["movie cells"]
    assert layer.data.shape == (2, *base.shape)
    _check_features(layer)
    for t in range(2):  # every plane has cells, ids unique over the stack, plane column right
        ids = set(np.unique(layer.data[t]).tolist()) - {0}
        assert ids
        assert ids == set(layer.features.loc[layer.features["plane_0"] == t, "index"])
    before = np.array(layer.data)

    viewer.dims.set_current_step(0, 1)
    widget.scope.value = "current plane"
    _segment(qtbot, widget)
    after = np.asarray(layer.data)
    assert np.array_equal(after[0], before[0])                    # the other plane untouched
    assert np.array_equal(after[1] > 0, before[1] > 0)            # same model, same cells
    assert set(np.unique(after[1]).tolist()).isdisjoint(set(np.unique(before).tolist()) - {0})
    _check_features(layer)


def _write_run(folder: Path, name: str):
    """A run folder as `cellsam-rt run` writes it."""
    from cellsam_rt.io import write_labels_tiff, write_table_csv
    from cellsam_rt.pipeline import Segmenter
    image = tifffile.imread(SAMPLE_PATH)
    result = Segmenter().segment(image)
    folder.mkdir(parents=True, exist_ok=True)
    write_labels_tiff(folder / f"{name}_labels.tif", result.labels)
    write_table_csv(folder / f"{name}_cells.csv", result.table)
    return result


def test_napari_reader_and_writer_round_trip_a_run_folder(make_napari_viewer, plugin, tmp_path):
    result = _write_run(tmp_path / "run", "img")
    viewer = make_napari_viewer()
    layers = viewer.open(tmp_path / "run", plugin=PLUGIN)
    assert len(layers) == 1
    layer = layers[0]
    assert layer.name == "img cells"
    assert np.array_equal(layer.data, result.labels)
    _check_features(layer)
    csv = pd.read_csv(tmp_path / "run" / "img_cells.csv")
    assert np.allclose(layer.features["score"], csv["score"])

    # Correct the labels: drop one cell, grow another, then save through the plugin's writer.
    ids = layer.features["index"].to_numpy()
    dropped, grown = int(ids[0]), int(ids[1])
    data = np.array(layer.data)
    data[data == dropped] = 0
    ys, xs = np.nonzero(data == grown)
    data[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = np.where(
        data[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == 0, grown,
        data[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    layer.data = data
    out = tmp_path / "fixed"
    out.mkdir()
    written = layer.save(str(out / "img_labels.tif"), plugin=PLUGIN)
    assert sorted(Path(p).name for p in written) == ["img_cells.csv", "img_labels.tif"]
    assert not list(out.glob(".*part"))  # no temporary files left
    assert np.array_equal(tifffile.imread(out / "img_labels.tif"), data)
    table = pd.read_csv(out / "img_cells.csv")
    assert dropped not in table["label"].to_numpy()
    assert table["label"].tolist() == sorted(set(np.unique(data).tolist()) - {0})
    row = table.set_index("label").loc[grown]
    assert row["area"] == int((data == grown).sum())
    assert np.isnan(row["mean_intensity_0"])          # edited: old intensity no longer valid
    old = csv.set_index("label")
    other = int(ids[2])
    assert table.set_index("label").loc[other, "mean_intensity_0"] == pytest.approx(
        old.loc[other, "mean_intensity_0"])
    assert table.set_index("label").loc[grown, "score"] == pytest.approx(old.loc[grown, "score"])

    # ...and the saved folder opens again.
    again = viewer.open(out, plugin=PLUGIN)[0]
    assert np.array_equal(again.data, data)
    assert len(again.features) == len(table)


def test_napari_tracks_layer_opens_from_tracking_result(make_napari_viewer, plugin, tmp_path):
    # Two frames: track 1 divides into 2 and 3 at t=1; track 4 is alone.
    masks = np.zeros((2, 32, 32), np.uint16)
    masks[0, 4:10, 4:10] = 1
    masks[0, 20:26, 20:26] = 4
    masks[1, 2:8, 4:10] = 2
    masks[1, 10:14, 4:10] = 3
    masks[1, 20:26, 21:27] = 4
    for t in range(2):
        tifffile.imwrite(tmp_path / f"mask{t:03d}.tif", masks[t])
    rows = []
    for t in range(2):
        for lab in np.unique(masks[t])[1:]:
            ys, xs = np.nonzero(masks[t] == lab)
            rows.append({"track_id": int(lab), "t": t, "y": ys.mean(), "x": xs.mean(),
                         "area": len(ys), "parent_track_id": 1 if lab in (2, 3) else 0})
    pd.DataFrame(rows).to_csv(tmp_path / "tracks.csv", index=False)

    viewer = make_napari_viewer()
    layers = viewer.open(tmp_path, plugin=PLUGIN)
    kinds = {type(layer).__name__: layer for layer in layers}
    assert set(kinds) == {"Labels", "Tracks"}
    tracks = kinds["Tracks"]
    assert tracks.graph == {2: [1], 3: [1]}
    assert sorted(tracks.data[:, 0].astype(int).tolist()) == [1, 2, 3, 4, 4]
    row = tracks.data[(tracks.data[:, 0] == 4) & (tracks.data[:, 1] == 1)][0]
    assert row[2:] == pytest.approx([22.5, 23.5])
    assert np.array_equal(kinds["Labels"].data, masks)
    # tracks.csv alone opens the same way.
    again = viewer.open(tmp_path / "tracks.csv", plugin=PLUGIN)
    assert {type(layer).__name__ for layer in again} == {"Labels", "Tracks"}


def test_napari_opens_a_cellsam_rt_track_result(make_napari_viewer, plugin, tmp_path):
    synth = pytest.importorskip("cellsam_rt.workflows.timelapse_synth")
    pytest.importorskip("cellsam_rt.cli.track")
    from cellsam_rt.cli.main import main
    movie = synth.make_movie(n_frames=6, shape=(96, 96), n_cells=4, divisions=1, seed=1,
                             render=False)
    tifffile.imwrite(tmp_path / "labels.tif", movie.labels.astype(np.uint16))
    assert main(["track", str(tmp_path / "labels.tif"), "--labels", "--out",
                 str(tmp_path / "tracked"), "--quiet"]) == 0
    viewer = make_napari_viewer()
    layers = viewer.open(tmp_path / "tracked", plugin=PLUGIN)
    kinds = {type(layer).__name__: layer for layer in layers}
    res = np.loadtxt(tmp_path / "tracked" / "res_track.txt", dtype=np.int64, ndmin=2)
    assert kinds["Tracks"].graph == {int(l): [int(p)] for l, _b, _e, p in res if p}
    assert kinds["Tracks"].graph  # the division is linked
    assert kinds["Labels"].data.shape == movie.labels.shape
    assert set(np.unique(kinds["Tracks"].data[:, 0]).astype(int)) == set(res[:, 0].tolist())


def test_napari_cli_opens_images_with_widget(make_napari_viewer, plugin, tmp_path):
    from cellsam_rt.cli.napari import open_viewer, read_layers
    path = tmp_path / "cells.npy"
    np.save(path, tifffile.imread(SAMPLE_PATH))
    viewer = make_napari_viewer()
    _viewer, widget = open_viewer(read_layers([path]), viewer)
    assert [layer.name for layer in viewer.layers] == ["cells"]
    assert widget.image.value is viewer.layers["cells"]
    with pytest.raises(ValueError, match="no such file"):
        read_layers([tmp_path / "missing.tif"])
    # A time-lapse with two channels (which `run` refuses) opens as one stack per channel.
    movie = np.zeros((3, 2, 16, 16), np.uint16)
    tifffile.imwrite(tmp_path / "movie.tif", movie, imagej=True, metadata={"axes": "TCYX"})
    (data, meta, kind), = read_layers([tmp_path / "movie.tif"])
    assert kind == "image" and data.shape == movie.shape and meta["channel_axis"] == 1


def test_napari_cli_without_napari_says_how_to_install():
    code = ("import sys; sys.modules['napari'] = None\n"
            "from cellsam_rt.cli.main import main\n"
            "sys.exit(main(['napari']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: napari is not installed: "
                                   "pip install 'cellsam-rt[napari]'")
