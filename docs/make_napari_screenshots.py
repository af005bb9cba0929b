"""Make the screenshots of docs/napari.md from a real napari viewer with the shipped model.

    xvfb-run -a python docs/make_napari_screenshots.py      # headless (Linux)
    python docs/make_napari_screenshots.py                  # with a display

Writes docs/images/napari_segment.png, napari_boxes.png and napari_tracks.png (palette PNGs).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image as PILImage

OUT = Path(__file__).resolve().parent / "images"
SIZE = (1280, 760)


def _wait(app, widget, done: int, timeout: float = 120.0) -> None:
    t0 = time.perf_counter()
    while widget.jobs_done <= done or widget.busy:
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("segmentation did not finish")


def _save(viewer, name: str) -> Path:
    """A window screenshot as a 256-colour PNG (small enough for the repository)."""
    shot = viewer.screenshot(canvas_only=False, flash=False)
    img = PILImage.fromarray(np.ascontiguousarray(shot[..., :3]))
    img = img.quantize(colors=256, method=PILImage.Quantize.MEDIANCUT)
    path = OUT / name
    img.save(path, optimize=True)
    print(f"{path} ({path.stat().st_size // 1024} KB)")
    return path


def _hover(viewer, labels, row) -> None:
    """Put the cursor on a cell so that the status bar shows its table row."""
    viewer.cursor.position = (float(row["centroid_y"]), float(row["centroid_x"]))
    viewer.update_status_from_cursor()


def _tracks_folder(folder: Path) -> Path:
    """A small synthetic tracking result: drifting blobs, one of which divides."""
    n_t, size = 12, 128
    yy, xx = np.mgrid[:size, :size]
    rows, masks = [], np.zeros((n_t, size, size), np.uint16)
    for t in range(n_t):
        cells = {1: (30 + 2 * t, 30 + 3 * t), 2: (90 - t, 40 + 2 * t)}
        if t < 6:
            cells[3] = (60 + t, 95)
        else:  # 3 divides into 4 and 5
            cells[4] = (60 + t - 2 * (t - 5), 95 - (t - 5))
            cells[5] = (60 + t + 2 * (t - 5), 95 + (t - 5))
        for lab, (cy, cx) in cells.items():
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
            masks[t][disk] = lab
            rows.append({"track_id": lab, "t": t, "y": float(cy), "x": float(cx),
                         "area": int(disk.sum()), "parent_track_id": 3 if lab in (4, 5) else 0})
    for t in range(n_t):
        tifffile.imwrite(folder / f"mask{t:03d}.tif", masks[t])
    pd.DataFrame(rows).to_csv(folder / "tracks.csv", index=False)
    return folder


def main() -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from cellsam_rt.napari.reader import read_tracks
    from cellsam_rt.napari.sample import nuclei_sample
    from cellsam_rt.napari.widget import SegmentWidget

    OUT.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication(sys.argv)

    # 1. Automatic segmentation of the sample, a cell hovered.
    viewer = napari.Viewer(show=True)
    viewer.window.resize(*SIZE)
    data, meta, _ = nuclei_sample()[0]
    image = viewer.add_image(data, **meta)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="cellsam-rt: Segment cells", area="right")
    done = widget.jobs_done
    widget.start_segment()
    _wait(app, widget, done)
    labels = viewer.layers[f"{image.name} cells"]
    viewer.layers.selection.active = labels
    labels.show_selected_label = False
    feats = labels.features
    fill = feats["area"] / ((feats["bbox_max_row"] - feats["bbox_min_row"])
                            * (feats["bbox_max_col"] - feats["bbox_min_col"]))
    compact = feats[(fill > 0.6) & (feats["area"] > 100)].sort_values("area")
    row = compact.iloc[len(compact) // 2]
    viewer.reset_view()
    _hover(viewer, labels, row)
    app.processEvents()
    _save(viewer, "napari_segment.png")

    # 2. Box prompts: three cells removed, then drawn back as boxes.
    gone = compact.iloc[-3:]
    lab = np.array(labels.data)
    lab[np.isin(lab, gone["index"].to_numpy())] = 0
    labels.data = lab
    labels.features = feats[~feats["index"].isin(gone["index"])].reset_index(drop=True)
    widget._draw_boxes()
    shapes = widget.shapes.value
    done = widget.jobs_done
    shapes.add_rectangles([np.array([[r.bbox_min_row - 2, r.bbox_min_col - 2],
                                     [r.bbox_max_row + 1, r.bbox_max_col + 1]], float)
                           for r in gone.itertuples()])
    _wait(app, widget, done)
    shapes.mode = "pan_zoom"
    new = labels.features.iloc[-1]
    viewer.layers.selection.active = labels
    _hover(viewer, labels, new)
    app.processEvents()
    _save(viewer, "napari_boxes.png")
    viewer.close()

    # 3. A tracking result folder: masks and tracks with a division.
    viewer = napari.Viewer(show=True)
    viewer.window.resize(*SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "movie"
        folder.mkdir()
        for data, meta, kind in read_tracks(_tracks_folder(folder)):
            getattr(viewer, f"add_{kind}")(data, **meta)
    viewer.layers["movie tracks"].tail_width = 4
    viewer.dims.set_current_step(0, 11)
    viewer.reset_view()
    app.processEvents()
    _save(viewer, "napari_tracks.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
