"""The Segment dock widget: automatic segmentation of an image layer (one plane or every plane)
and box prompts drawn in a Shapes layer, both in worker threads with progress and cancel."""
from __future__ import annotations

import threading
import time
from typing import Optional

import numpy as np
import pandas as pd
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, Label, LineEdit,
                              ProgressBar, PushButton)
from napari.layers import Image, Labels, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

from cellsam_rt.backends import BACKENDS, PRECISIONS
from cellsam_rt.config import AUGMENT_MODES, DENOISE_MODES, OUTLINES, POLARITIES
from cellsam_rt.napari.engine import Cancelled, ModelOptions, get_engine, parse_channels
from cellsam_rt.napari.layers import (boxes_by_plane, current_plane_index, drop_rows,
                                      features_frame, image_plane, merge_new_labels, plane_shape,
                                      spatial_shape)
from cellsam_rt.pipeline import TILE_MODES
from cellsam_rt.stages.postprocess import cell_table

__all__ = ["SegmentWidget"]

SCOPES = ("current plane", "all planes")


class SegmentWidget(Container):
    """Segments the chosen image layer into a Labels layer `<image> cells` with a cell table."""

    def __init__(self, napari_viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._layer_choices(Image))
        self.wholecell = ComboBox(label="whole-cell", nullable=True,
                                  choices=self._layer_choices(Image),
                                  tooltip="optional second layer: the whole-cell channel")
        self.scope = ComboBox(label="planes", choices=SCOPES, value=SCOPES[0],
                              tooltip="the plane shown, or every plane / time point")
        self.model = FileEdit(label="model", mode="d", nullable=True,
                              tooltip="a model folder; empty: the default model")
        self.backend = ComboBox(label="backend", choices=BACKENDS, value="cpu")
        self.precision = ComboBox(label="precision", choices=PRECISIONS, value="fp32")
        self.tile = ComboBox(label="tiles", choices=TILE_MODES, value="auto",
                             tooltip="auto: tile when cells are small for the model's input")
        self.polarity = ComboBox(label="objects", choices=POLARITIES, value="auto",
                                 tooltip="bright: fluorescence; dark: darker than the background "
                                         "(inverted for the model); auto: decided per image")
        self.outline = ComboBox(label="outlines", choices=OUTLINES, value="auto",
                                tooltip="model: the mask decoder's; contrast: edges redrawn in "
                                        "the image, faint objects and fragments dropped; auto: "
                                        "the model's choice (contrast for the default model)")
        self.denoise = ComboBox(label="noise", choices=DENOISE_MODES, value="auto",
                                tooltip="gaussian: a very noisy image is smoothed before the model "
                                        "reads it; off: read as given; auto: the model's choice "
                                        "(off for the default model)")
        self.augment = ComboBox(label="views", choices=AUGMENT_MODES, value="auto",
                                tooltip="flips: also segment the image mirrored three ways and "
                                        "keep the cells two of the four views find (four "
                                        "segmentations); off: once; auto: the model's choice "
                                        "(off for the default model)")
        self.channels = LineEdit(label="channels", value="",
                                 tooltip="for a multi-channel layer: NUCLEAR or NUCLEAR,WHOLECELL "
                                         "channel indices (e.g. 0 or 0,1); empty: automatic")
        self.run_button = PushButton(text="Segment")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1000, value=0)
        self.status = Label(label="", value="")
        self.shapes = ComboBox(label="boxes", nullable=True, choices=self._layer_choices(Shapes),
                               tooltip="rectangles drawn here become cells, one per box")
        self.live = CheckBox(text="segment boxes as they are drawn", value=True)
        self.draw_button = PushButton(text="Draw boxes")
        self.boxes_button = PushButton(text="Segment boxes")
        self.extend([self.image, self.wholecell, self.scope, self.model, self.backend,
                     self.precision, self.tile, self.polarity, self.outline, self.denoise,
                     self.augment, self.channels, self.run_button,
                     self.cancel_button, self.progress, self.status, self.shapes, self.live,
                     self.draw_button, self.boxes_button])

        self.worker = None            # the running job (segment or boxes), if any
        self.jobs_done = 0            # finished jobs (any outcome), for callers that wait
        self.last_box_seconds = None  # boxes drawn -> masks shown, of the last box job
        self._cancel = threading.Event()
        self._fraction = 0.0          # written by the worker thread, shown by the timer
        self.status_text = None       # likewise
        self._boxes_pending = False
        self._done_boxes: dict[int, set] = {}
        self._watched_shapes = None
        self._timer = QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._show_progress)

        self.run_button.changed.connect(self.start_segment)
        self.cancel_button.changed.connect(self.cancel)
        self.boxes_button.changed.connect(self.start_boxes)
        self.draw_button.changed.connect(self._draw_boxes)
        self.shapes.changed.connect(self._watch_shapes)
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed,
                   napari_viewer.layers.events.reordered):
            ev.connect(self._refresh_choices)
        self._refresh_choices()

    # ------------------------------------------------------------------ choices and options

    def _layer_choices(self, kind):
        return lambda _w: [(layer.name, layer) for layer in self.viewer.layers
                           if isinstance(layer, kind)]

    def _refresh_choices(self, *_):
        self.reset_choices()
        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and self.image.value is not active:
            self.image.value = active

    def _options(self) -> ModelOptions:
        model = self.model.value
        return ModelOptions(model="default" if model in (None, "") else str(model),
                            backend=self.backend.value, precision=self.precision.value,
                            tile=self.tile.value, polarity=self.polarity.value,
                            outline=self.outline.value, denoise=self.denoise.value,
                            augment=self.augment.value)

    @property
    def busy(self) -> bool:
        """True while a job runs."""
        return self.worker is not None

    @staticmethod
    def _input_plane(index, image_layer, wholecell_layer, channels):
        """The array to segment for one plane, and its channel choice."""
        img = image_plane(image_layer, index)
        if wholecell_layer is None:
            return img, channels
        whole = image_plane(wholecell_layer, index)
        if whole.shape != img.shape or img.ndim != 2:
            raise ValueError(f"whole-cell layer {wholecell_layer.name!r} {whole.shape} does not "
                             f"match {image_layer.name!r} {img.shape}")
        return np.stack([img, whole], axis=-1), (0, 1)

    # ------------------------------------------------------------------ automatic segmentation

    def _chosen_options(self):
        """(engine options, channels) from the widget, or None with the problem in the status."""
        try:
            return self._options(), parse_channels(self.channels.value)
        except ValueError as exc:
            self.status.value = str(exc)
            return None

    def start_segment(self, *_) -> None:
        """Segment the chosen planes of the image layer in a worker thread."""
        layer = self.image.value
        if layer is None or self.busy:
            self.status.value = "no image layer" if layer is None else "busy"
            return
        chosen = self._chosen_options()
        if chosen is None:
            return
        options, channels = chosen
        lead = plane_shape(layer)
        if not lead:
            planes = [()]
        elif self.scope.value == SCOPES[0]:
            planes = [current_plane_index(layer, self.viewer.dims.point)]
        else:
            planes = list(np.ndindex(*lead))
        wholecell = self.wholecell.value
        self._start(self._segment_job, self._segment_done, options, layer, wholecell, channels,
                    planes, message=f"segmenting {layer.name}")

    def _segment_job(self, options, layer, wholecell, channels, planes):
        """Worker thread: labels (ids unique over the planes) and features of each plane; when
        every plane is segmented they are written straight into one stack."""
        self.status_text = "loading model"
        engine = get_engine(options)
        full = len(planes) == int(np.prod(plane_shape(layer), dtype=np.int64))
        stack = np.zeros(spatial_shape(layer), np.uint32) if full else None
        results, offset = [], 0
        for k, index in enumerate(planes):
            if self._cancel.is_set():
                raise Cancelled()
            if len(planes) > 1:
                self.status_text = f"{layer.name}: plane {k + 1} of {len(planes)}"
            img, chans = self._input_plane(index, layer, wholecell, channels)

            def progress(done, total, k=k):
                self._fraction = (k + done / max(total, 1)) / len(planes)
            res = engine.segment(img, channels=chans, cancel=self._cancel, progress=progress)
            labels = res.labels.astype(np.uint32)
            labels[labels > 0] += offset
            table = res.table.copy()
            table["label"] += offset
            if stack is not None:
                stack[index] = labels
                labels = None
            results.append((index, labels, features_frame(table, index)))
            offset += int(res.labels.max(initial=0))
            self._fraction = (k + 1) / len(planes)
        return layer, stack, results

    def _segment_done(self, out) -> None:
        layer, stack, results = out
        target = self._labels_layer(layer)
        frames = [frame for _, _, frame in results]
        if stack is not None:  # every plane: a new layer content
            data = stack
        elif target is None:  # one plane, no layer yet
            data = np.zeros(spatial_shape(layer), np.uint32)
            for index, labels, _ in results:
                data[index] = labels
        else:  # one plane of an existing layer: its cells are replaced, new ids above the max
            data = np.asarray(target.data).astype(np.uint32)
            offset = int(data.max(initial=0))
            kept = target.features if len(target.features) else None
            frames = []
            for index, labels, frame in results:
                old = np.unique(data[index])
                data[index] = np.where(labels > 0, labels + offset, 0)
                frames.append(frame.assign(index=frame["index"] + offset,
                                           label=frame["label"] + offset))
                if kept is not None:  # rows of the replaced plane's cells go
                    kept = drop_rows(kept, np.setdiff1d(kept["index"].to_numpy(), old))
            if kept is not None:
                frames.insert(0, kept)
        features = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        data = data.astype(np.uint16) if data.max(initial=0) <= 65535 else data
        self._set_labels(layer, target, data, features)
        n = sum(len(f) for _, _, f in results)
        self.status.value = f"{n} cells in {layer.name}"

    # ------------------------------------------------------------------ box prompts

    def _draw_boxes(self, *_) -> None:
        """Pick (or make) a Shapes layer for box prompts and switch it to rectangle drawing."""
        shapes = self.shapes.value
        image = self.image.value
        if shapes is None:
            kw = {} if image is None else {"scale": image.scale, "translate": image.translate}
            shapes = self.viewer.add_shapes(name="boxes", edge_color="yellow",
                                            face_color="transparent", edge_width=2, **kw)
            self.shapes.value = shapes
        self.viewer.layers.selection.active = shapes
        shapes.mode = "add_rectangle"

    def _watch_shapes(self, *_) -> None:
        if self._watched_shapes is not None:
            self._watched_shapes.events.data.disconnect(self._on_shapes_data)
        self._watched_shapes = self.shapes.value
        if self._watched_shapes is not None:
            self._watched_shapes.events.data.connect(self._on_shapes_data)

    def _on_shapes_data(self, event) -> None:
        if self.live.value and str(getattr(event, "action", "")) == "added":
            self.start_boxes()

    @staticmethod
    def _box_key(shapes, i) -> tuple:
        return tuple(np.round(np.asarray(shapes.data[i], np.float64), 2).ravel().tolist())

    def start_boxes(self, *_) -> None:
        """Segment the rectangles not yet segmented, one cell per box (queued while busy)."""
        shapes, layer = self.shapes.value, self.image.value
        if shapes is None or layer is None:
            self.status.value = "choose an image and a boxes layer"
            return
        if self.busy:
            self._boxes_pending = True
            return
        done = self._done_boxes.setdefault(id(shapes), set())
        todo = [i for i in range(shapes.nshapes) if self._box_key(shapes, i) not in done]
        by_plane = boxes_by_plane(shapes, layer, todo)
        if not by_plane:
            return
        chosen = self._chosen_options()
        if chosen is None:
            return
        options, channels = chosen
        keys = {self._box_key(shapes, i) for items in by_plane.values() for i, _ in items}
        self._start(self._boxes_job, self._boxes_done, options, layer, self.wholecell.value,
                    channels, by_plane, keys, time.perf_counter(),
                    message=f"{len(keys)} box(es) on {layer.name}")

    def _boxes_job(self, options, layer, wholecell, channels, by_plane, keys, t0):
        """Worker thread: the masks of each plane's boxes (the plane's embedding is kept)."""
        engine = get_engine(options)
        out = []
        for index, items in by_plane.items():
            img, chans = self._input_plane(index, layer, wholecell, channels)
            boxes = np.stack([b for _, b in items])
            res = engine.segment(img, channels=chans, boxes=boxes, cancel=self._cancel)
            out.append((index, res.labels, img))
        return layer, out, keys, t0

    def _boxes_done(self, out) -> None:
        layer, planes, keys, t0 = out
        target = self._labels_layer(layer)
        if target is None:
            self._set_labels(layer, None, np.zeros(spatial_shape(layer), np.uint16),
                             pd.DataFrame())
            target = self._labels_layer(layer)
        frames = [target.features] if len(target.features) else []
        top = int(np.asarray(target.data).max(initial=0))
        edits, added = [], 0
        for index, new, img in planes:
            current = np.asarray(target.data[index])
            plane, given = merge_new_labels(current.copy(), new, top + 1)
            if given:
                top = max(given)
                rows = np.nonzero(plane != current)
                where = tuple(np.full(rows[0].size, i) for i in index) + rows
                edits.append((where, plane[rows]))
                only_new = np.where(np.isin(plane, given), plane, 0)
                frames.append(features_frame(cell_table(only_new, img), index))
                added += len(given)
        if top > np.iinfo(target.data.dtype).max:  # ids past the layer's dtype: widen, no undo
            data = np.asarray(target.data).astype(np.uint32)
            for where, values in edits:
                data[where] = values
            target.data = data
        else:  # only the new pixels, as one undoable edit (Ctrl+Z removes the box's cells)
            with target.block_history():
                for where, values in edits:
                    target.data_setitem(where, values)
        target.features = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        self.status_text = None
        self._done_boxes.setdefault(id(self.shapes.value), set()).update(keys)
        self.last_box_seconds = time.perf_counter() - t0
        self.status.value = f"{added} cell(s) added from {len(keys)} box(es)"

    # ------------------------------------------------------------------ jobs

    def _start(self, job, on_done, *args, message: str) -> None:
        self._cancel = threading.Event()
        self._fraction = 0.0
        self.status_text = message
        self.status.value = message
        self.run_button.enabled, self.cancel_button.enabled = False, True
        worker = create_worker(self._guard(job), *args, _start_thread=False)
        worker.returned.connect(lambda out: on_done(out) if out is not None else None)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._finished)
        self.worker = worker
        self._timer.start()
        worker.start()

    def _guard(self, job):
        def run(*args):
            try:
                return job(*args)
            except Cancelled:
                return None
        return run

    def cancel(self, *_) -> None:
        """Stop the running job at its next plane, tile or decoder chunk; nothing is added."""
        if self.busy:
            self._cancel.set()
            self._boxes_pending = False
            self.status_text = "cancelling"

    def _failed(self, exc) -> None:
        self.status.value = f"failed: {exc}"
        show_error(f"cellsam-rt: {exc}")

    def _finished(self) -> None:
        self._timer.stop()
        cancelled = self._cancel.is_set()
        self.worker = None
        self.run_button.enabled, self.cancel_button.enabled = True, False
        self.progress.value = 0 if cancelled else self.progress.max
        if cancelled:
            self.status.value = "cancelled"
            show_info("cellsam-rt: cancelled; no layer was changed")
        self.jobs_done += 1
        if self._boxes_pending and not cancelled:
            self._boxes_pending = False
            self.start_boxes()

    def _show_progress(self) -> None:
        self.progress.value = int(self._fraction * self.progress.max)
        if self.status_text:
            self.status.value = self.status_text

    # ------------------------------------------------------------------ the labels layer

    def _labels_layer(self, image) -> Optional[Labels]:
        name = f"{image.name} cells"
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if isinstance(layer, Labels) and layer.data.shape == spatial_shape(image):
            return layer
        return None

    def _set_labels(self, image, target, data, features) -> None:
        base = image.data[0] if image.multiscale else image.data
        meta = {"cellsam_rt": {"image": base, "source": image.name}}
        self.status_text = None
        if target is None:
            self.viewer.add_labels(data, name=f"{image.name} cells", features=features,
                                   scale=image.scale, translate=image.translate, metadata=meta,
                                   opacity=0.5)
        else:
            target.data = data
            target.features = features
            target.metadata.update(meta)
