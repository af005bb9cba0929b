"""Box prompt latency in napari: from a rectangle added to a Shapes layer to its cell shown.

Runs a real viewer (use Xvfb when headless) with the Segment widget, on the plugin's sample:

    xvfb-run -a python benchmarks/bench_napari_box.py                   # default model
    xvfb-run -a python benchmarks/bench_napari_box.py --model DIR --tile never

The first box of an image pays for preprocessing and the encoder; later boxes reuse the kept
embedding and pay only for the mask decoder, the merge into the Labels layer and one repaint.
Printed per box: `shown` (rectangle added -> layer updated and the event loop has repainted;
with software OpenGL, as under Xvfb, the repaint dominates), `layer_updated` (the "added" event
-> new cell in the Labels layer, no repaint), `engine` (the Segmenter call alone, no GUI), and
the encoder runs so far.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def _boxes(labels_table, n: int) -> list[np.ndarray]:
    """Rectangles around n compact cells found by automatic segmentation (spread over the image)."""
    t = labels_table
    fill = t["area"] / ((t["bbox_max_row"] - t["bbox_min_row"]) * (t["bbox_max_col"]
                                                                  - t["bbox_min_col"]))
    rows = t[(fill > 0.5) & (t["area"] > 60)]
    rows = rows.iloc[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)]
    return [np.array([[r.bbox_min_row - 2, r.bbox_min_col - 2],
                      [r.bbox_max_row + 1, r.bbox_max_col + 1]], float)
            for r in rows.itertuples()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model folder (default: shipped model)")
    parser.add_argument("--tile", default="auto", choices=("auto", "never", "always"))
    parser.add_argument("--boxes", type=int, default=10, help="boxes to time (default 10)")
    args = parser.parse_args(argv)

    import napari
    import pandas as pd
    import tifffile
    from qtpy.QtWidgets import QApplication

    from cellsam_rt.napari.engine import ModelOptions, get_engine
    from cellsam_rt.napari.sample import SAMPLE_PATH
    from cellsam_rt.napari.widget import SegmentWidget
    from cellsam_rt.pipeline import Segmenter

    image = tifffile.imread(SAMPLE_PATH)
    # Box positions from the shipped model (a random-weight model finds no real cells).
    table = pd.DataFrame(Segmenter().segment(image).table)
    rects = _boxes(table, args.boxes + 1)

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    layer = viewer.add_image(image, name="nuclei")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    if args.model != "default":
        widget.model.value = args.model
    widget.tile.value = args.tile
    engine = get_engine(ModelOptions(model=args.model, tile=args.tile))
    engine.clear_cache()
    shapes = viewer.add_shapes(name="boxes")
    widget.shapes.value = shapes
    viewer.layers.selection.active = layer

    def add_box(rect) -> float:
        done = widget.jobs_done
        t0 = time.perf_counter()
        shapes.add_rectangles([rect])
        while widget.jobs_done <= done:
            app.processEvents()
            time.sleep(0.0005)
        app.processEvents()  # the repaint of the updated Labels layer
        return time.perf_counter() - t0

    records = []
    for k, rect in enumerate(rects):
        shown = add_box(rect)
        # The same box through the engine alone (embedding now kept), for the GUI's share.
        box = np.array([rect[0, 1], rect[0, 0], rect[1, 1], rect[1, 0]], np.float32)[None]
        t0 = time.perf_counter()
        engine.segment(image, boxes=box)
        records.append({"box": k, "shown_s": round(shown, 4),
                        "layer_updated_s": round(widget.last_box_seconds, 4),
                        "engine_s": round(time.perf_counter() - t0, 4),
                        "encoder_runs": engine.backend.encoder_runs})
        print(json.dumps(records[-1]), flush=True)
    later = records[1:]
    print(json.dumps({
        "model": args.model, "tile": args.tile, "image": list(image.shape),
        "first_box_shown_s": records[0]["shown_s"],
        "cached_box_shown_median_s": round(statistics.median(r["shown_s"] for r in later), 4),
        "cached_box_layer_updated_median_s": round(
            statistics.median(r["layer_updated_s"] for r in later), 4),
        "cached_box_engine_median_s": round(statistics.median(r["engine_s"] for r in later), 4),
        "cells_added": int(len(np.unique(viewer.layers["nuclei cells"].data)) - 1),
        "encoder_runs": engine.backend.encoder_runs,
    }), flush=True)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
