"""`cellsam-rt napari [IMAGE ...]`: napari with the Segment widget docked and the inputs open."""
from __future__ import annotations

import argparse
from pathlib import Path

from cellsam_rt.cli.main import error
from cellsam_rt.errors import CellsamRtError

INSTALL_HINT = "pip install 'cellsam-rt[napari]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the napari command."""
    parser.add_argument("inputs", nargs="*", metavar="PATH",
                        help="images (TIFF/OME-TIFF, PNG/JPEG, NPY), run output folders or "
                             "<name>_labels.tif files, tracking result folders")


def read_layers(paths) -> list[tuple]:
    """Layer data of every input, read before any window opens (ValueError names a bad input)."""
    from cellsam_rt.napari.reader import get_reader

    layers = []
    for path in paths:
        if not Path(path).exists():
            raise ValueError(f"{path}: no such file or folder")
        reader = get_reader(str(path))
        if reader is None:
            raise ValueError(f"{path}: not an image, run output or tracking result")
        layers.extend(reader(str(path)))
    return layers


def open_viewer(layers, viewer=None):
    """A viewer (made if not given) with the Segment widget docked and `layers` added."""
    import napari
    from cellsam_rt.napari.widget import SegmentWidget

    viewer = viewer or napari.Viewer()
    for data, meta, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **meta)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="cellsam-rt: Segment cells", area="right")
    return viewer, widget


def run(args: argparse.Namespace) -> int:
    """Open the viewer and block until it is closed."""
    try:
        import napari
    except ImportError:
        error(f"napari is not installed: {INSTALL_HINT}")
        return 2
    try:
        layers = read_layers(args.inputs)
    except (CellsamRtError, ValueError, OSError) as exc:
        error(str(exc))
        return 2
    open_viewer(layers)
    napari.run()
    return 0
