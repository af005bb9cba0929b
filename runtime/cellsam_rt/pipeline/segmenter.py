"""The segmentation pipeline: the one place that knows the stage order (docs/design.md §2).

Whole image: preprocess -> encoder + CellFinder -> detections (or user boxes) -> batched mask
decoding in bounded chunks -> exact ROI paste -> the reference's hole filling -> cell table.
Large images go through the same per-image stages tile by tile, in batches (`tiling.py`).
"""
from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from cellsam_rt.pipeline.augment import segment_flips
from cellsam_rt.pipeline.native import estimate_scale, segment_native, whole_image_diameter
from cellsam_rt.pipeline.noise import model_view
from cellsam_rt.pipeline.polarity import single_plane
from cellsam_rt.pipeline.results import PreparedImage, SegmentationResult, _ImageSeg
from cellsam_rt.stages import scale as sc, tiling
from cellsam_rt.backends import Backend, create_backend
from cellsam_rt.config import (AUGMENT_MODES, DECODER_MODES, DENOISE_MODES, OUTLINES, POLARITIES,
                               TILE_MODES)
from cellsam_rt.stages.detect import boxes_to_model_space, decode_detections
from cellsam_rt.stages.masks import decode_masks, paste_masks, window_options
from cellsam_rt.errors import ModelDirError
from cellsam_rt.model_dir import ModelDir, resolve_model
from cellsam_rt.stages.outline import contrast_outlines
from cellsam_rt.stages.postprocess import (cell_table, fill_holes_and_remove_small, label_dtype,
                                           label_sources)
from cellsam_rt.stages.preprocess import (channels_last as _channels_last, format_channels,
                                          preprocess)

__all__ = ["Segmenter", "SegmentationResult", "TILE_MODES"]


class _Timer:
    """Accumulates wall time per stage name."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


class Segmenter:
    """Segments images with a CellSAM model directory on a chosen backend."""

    def __init__(self, model: "str | Path | ModelDir" = "default", backend: "str | Backend" = "cpu",
                 precision: str = "fp32", threads: Optional[int] = None, tile: str = "auto",
                 bbox_threshold: Optional[float] = None, chunk_size: Optional[int] = None,
                 batch_size: int = 4, decoder: str = "auto", diameter: Optional[float] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 polarity: str = "auto", outline: str = "auto", denoise: str = "auto",
                 augment: str = "auto") -> None:
        for name, value, modes in (
                ("tile", tile, TILE_MODES), ("polarity", polarity, POLARITIES),
                ("outline", outline, OUTLINES), ("denoise", denoise, DENOISE_MODES),
                ("augment", augment, AUGMENT_MODES), ("decoder", decoder, DECODER_MODES)):
            if value not in modes:
                raise ValueError(f"{name} must be one of {modes}, got {value!r}")
        if diameter is not None and not (diameter > 0 and np.isfinite(diameter)):
            raise ValueError(f"diameter must be a positive number of pixels, got {diameter!r}")
        if (chunk_size is not None and chunk_size < 1) or batch_size < 1:
            raise ValueError(f"chunk_size and batch_size must be >= 1, got {chunk_size}, "
                             f"{batch_size}")
        self.model_dir = resolve_model(model)
        self.backend = (backend if isinstance(backend, Backend) else
                        create_backend(self.model_dir, backend=backend, precision=precision,
                                       threads=threads))
        th = self.model_dir.thresholds
        self.bbox_threshold = float(th["bbox_threshold"] if bbox_threshold is None
                                    else bbox_threshold)
        self.iou_threshold = float(th["iou_threshold"])
        self.mask_threshold = float(th["mask_threshold"])
        self.min_size = int(th["min_size"])
        self.size = self.model_dir.image_size
        self.has_model_cp = self.model_dir.has_model_cp
        self.tile = tile
        self.polarity = polarity  # dark objects on a bright background: see polarity.py
        # Masks read against the image (stages/outline.py) where asked or the model states it.
        self.outline = self.model_dir.outline if outline == "auto" else outline
        # Very noisy images smoothed first (stages/denoise.py), where asked or the model states it.
        self.denoise = self.model_dir.denoise if denoise == "auto" else denoise
        self.augment = self.model_dir.augment if augment == "auto" else augment  # see segment()
        self.diameter = None if diameter is None else float(diameter)
        # The scale policy measures objects by their detection boxes; a diameter is given (and
        # estimated) as the diameter of a disc of the cell's area.
        self.box_ratio = self.model_dir.box_diameter_ratio
        self.box_diameter = None if diameter is None else self.diameter * self.box_ratio
        # Scale-aware tiling (tile="auto") needs the model's object diameter.
        self.object_diameter = self.model_dir.object_diameter
        if self.diameter is not None and self.object_diameter is None and tile == "auto":
            raise ModelDirError(
                f"{self.model_dir.manifest_path}: this model states no object_diameter, so "
                "--diameter cannot set its scale (add the key: the cell diameter, in "
                "model-input pixels, it segments best)")
        # Boxes per decoder call: the backend's choice unless given (CPU 4, GPU 32).
        self.chunk_size = int(chunk_size or self.backend.decoder_chunk_size)
        self.batch_size = int(batch_size)
        self.progress = progress
        # The windowed decoder where the model has one and this backend runs it (decoder="auto").
        policy = self.model_dir.decoder_window
        self.decoder_window = (policy if decoder == "auto" and policy is not None
                               and self.backend.has_graph("decoder_window") else None)
        self._window_kw = window_options(self.backend, self.decoder_window)  # for decode_masks

    # ------------------------------------------------------------------ public

    def prepare(self, image: np.ndarray, channels=None) -> PreparedImage:
        """Channel layout, normalisation and resizing of one image (thread-safe; the only model
        calls are the detector's checks of an image that may show dark objects or, with
        denoise="gaussian", heavy noise).

        An image the native-scale path will take whole is only checked here (its tiles are
        prepared as they stream); img3 is then None."""
        t0 = time.perf_counter()
        view = model_view(self, image, channels)
        image = image if view is None else view
        if self._surely_native(image):
            ch = _channels_last(image)  # a crop that keeps every channel, for channel errors now
            k = ch.shape[-1] + 1 if ch.ndim == 3 else 2
            format_channels(ch[:k, :k], channels)
            return PreparedImage(None, None, None, time.perf_counter() - t0, view)
        img3 = format_channels(image, channels)
        enc = fin = None
        if self.tile != "always":
            enc, fin, _ = preprocess(img3, self.size, self.has_model_cp)
        return PreparedImage(img3, enc, fin, time.perf_counter() - t0, view)

    # ------------------------------------------------------------------ scale policy

    def estimate_diameter(self, image: np.ndarray, channels=None) -> float:
        """The median object diameter of an image, in its pixels (a disc of the object's area),
        as the tile policy measures it (detector only: the whole image, or probes at the image's
        own scale for a small or large image, refined once more where the first look is off the
        model's size); NaN when too few objects are found. Needs a model that states its object
        diameter."""
        if self.object_diameter is None:
            raise ModelDirError(f"{self.model_dir.manifest_path}: this model states no "
                                "object_diameter to measure objects against")
        view = model_view(self, image, channels)
        image = _channels_last(image if view is None else view)
        h, w = image.shape[:2]
        start = 1.0
        if self.size / sc.RESCALE_TOLERANCE <= max(h, w) <= self.size * sc.RESCALE_TOLERANCE:
            d, d_img = whole_image_diameter(self, image, channels)
            if not np.isfinite(d):
                return float("nan")
            if sc.within_tolerance(self.object_diameter / d):
                return d_img / self.box_ratio
            start = self.object_diameter / d_img
        scale = estimate_scale(self, image, channels, start, snap=False)
        return self.object_diameter / scale / self.box_ratio

    def _fits_whole(self, shape, scale: float) -> bool:
        """Whether the whole-image pass (the image resized to the model input) shows the objects
        close enough to the scale they need."""
        h, w = int(shape[0]), int(shape[1])
        return (sc.within_tolerance(self.size / h / scale)
                and sc.within_tolerance(self.size / w / scale))

    def _scale_aware(self) -> bool:
        return self.tile == "auto" and self.object_diameter is not None

    def _surely_native(self, image: np.ndarray) -> bool:
        """The native-scale path, decided before any model call: a given diameter that the
        whole-image pass does not fit, or an image too large for that pass to estimate it."""
        if not self._scale_aware():
            return False
        shape = _channels_last(image).shape
        if self.diameter is not None:
            return not self._fits_whole(shape, self.object_diameter / self.box_diameter)
        return max(shape[0], shape[1]) > self.size * sc.RESCALE_TOLERANCE

    def segment(self, image: np.ndarray, channels=None, boxes: Optional[np.ndarray] = None,
                prepared: Optional[PreparedImage] = None) -> SegmentationResult:
        """Segment one image (2-D, or 3-D with <= 3 channels); `boxes` are xyxy image-pixel prompts.
        With augment="flips" and no boxes, the image's mirrored views vote (pipeline/augment.py)."""
        result = self._segment(image, channels, boxes, prepared)
        if self.augment != "flips" or boxes is not None:  # a user's box is a cell already
            return result
        return segment_flips(lambda view: self._segment(view, channels, None, None), image, result)

    def _segment(self, image: np.ndarray, channels, boxes: Optional[np.ndarray],
                 prepared: Optional[PreparedImage]) -> SegmentationResult:
        timer = _Timer()
        t_start = time.perf_counter()
        if prepared is None:
            with timer("preprocess"):
                prepared = self.prepare(image, channels)
        else:
            timer.times["preprocess"] = prepared.seconds  # done earlier, on a worker thread
        # The model reads the oriented view; the cell table measures the image as given.
        source, image = image, (image if prepared.view is None else prepared.view)
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        finish = functools.partial(self._finish, source, image, boxes is not None)
        if prepared.img3 is None:  # the native-scale path, decided in prepare()
            *result, scale = self._segment_native(image, channels, boxes, timer)
            return finish(*result, timer, t_start, tiled=True, scale=scale)
        img3 = prepared.img3
        h, w = img3.shape[:2]

        tiled = self.tile == "always"
        if not tiled:
            inputs = None
            if prepared.encoder_in is not None:
                inputs = [(prepared.encoder_in, prepared.cellfinder_in)]
            check = start = None
            if self._scale_aware() and self.diameter is None:
                if max(h, w) * sc.RESCALE_TOLERANCE < self.size:
                    # A small image would be stretched far past its size, where texture passes
                    # for objects: measure it at its own scale first (with user boxes too, so
                    # that prompts see the image as its segmentation did).
                    with timer("scale"):
                        scale = estimate_scale(self, _channels_last(image), channels, 1.0)
                    if not self._fits_whole((h, w), scale):
                        *result, scale = self._segment_native(image, channels, boxes, timer,
                                                              scale=scale)
                        return finish(*result, timer, t_start, tiled=True, scale=scale)
                elif boxes is None:
                    # The whole-image pass measures the objects; too far from the model's size,
                    # the image goes the native-scale way instead (nothing decoded yet).
                    def check(prompts: np.ndarray) -> bool:
                        d = sc.box_diameter(prompts)
                        return not np.isfinite(d) or sc.within_tolerance(self.object_diameter / d)
                else:  # user boxes: measured as without them, decoded at that scale
                    with timer("scale"):
                        d, d_img = whole_image_diameter(self, img3, None, prepared.cellfinder_in)
                    if np.isfinite(d) and not sc.within_tolerance(self.object_diameter / d):
                        start = self.object_diameter / d_img
            seg = None if start else self._segment_images(
                [img3], None if boxes is None else [boxes], timer, inputs, check=check)
            if seg is None:
                if start is None:  # the whole-image pass found the objects off the model's size
                    d = sc.box_diameter(self._last_prompts, h / self.size, w / self.size)
                    start = self.object_diameter / d
                *result, scale = self._segment_native(image, channels, boxes, timer, start)
                return finish(*result, timer, t_start, tiled=True, scale=scale)
            seg = seg[0]
            if self.progress is not None:
                self.progress(1, 1)
            labels, label_ids = seg.labels, seg.label_ids
            boxes_img = seg.boxes_s * np.array([w, h, w, h], np.float32) / np.float32(self.size)
            scores = seg.scores
            # The reference's gauge (small median cells -> segment again, tiled), where tiles
            # can show the cells larger than the whole-image pass did.
            if (self.tile == "auto" and not self._scale_aware()
                    and tiling.tiles_add_resolution(labels.shape)
                    and tiling.median_area_fraction(labels) < tiling.TILE_MEDIAN_AREA_FRACTION):
                tiled = True
        if tiled:
            labels, label_ids, boxes_img, scores = self._segment_tiled(img3, boxes, timer)
        return finish(labels, label_ids, boxes_img, scores, timer, t_start, tiled=tiled)

    def _segment_native(self, image: np.ndarray, channels, boxes, timer: _Timer,
                        start: Optional[float] = None, scale: Optional[float] = None):
        """The native-scale path: at `scale`, or the scale from the diameter, or one estimated
        by detector probes (from `start`, a first estimate); then native-scale tiles."""
        image = _channels_last(image)
        if scale is None and self.diameter is not None:
            scale = self.object_diameter / self.box_diameter
        elif scale is None:
            with timer("scale"):
                scale = estimate_scale(self, image, channels, start or 1.0)
        labels, ids, boxes_img, scores = segment_native(self, image, channels, scale, timer, boxes)
        return labels, ids, boxes_img, scores, scale

    def _finish(self, image, view, prompted: bool, labels, label_ids, boxes_img, scores,
                timer: _Timer, t_start: float, tiled: bool = False, scale: Optional[float] = None
                ) -> SegmentationResult:
        """The result: masks read against the image and kept whole (where the outline mode asks),
        labels in their dtype, the cell table, the timings. `image` is the image as given,
        `view` the one the model read; `prompted`: the boxes are the user's, each a cell to keep
        however faint."""
        if self.outline == "contrast" and labels.ndim == 2 and labels.any():
            with timer("outline"):
                labels = contrast_outlines(labels, single_plane(view), prompted)
                # Faint masks and fragments are gone (a presence table: no sort of the pixels).
                ids = np.asarray(label_ids, np.int64)
                kept = np.bincount(labels.ravel(), minlength=int(ids.max(initial=0)) + 1
                                   ).astype(bool)[ids]
                label_ids = ids[kept]
                boxes_img = np.asarray(boxes_img, np.float32).reshape(-1, 4)[kept]
                scores = np.asarray(scores)[kept]
        with timer("table"):
            labels = labels.astype(label_dtype(int(labels.max()) if labels.size else 0),
                                   copy=False)
            scores = np.asarray(scores, dtype=np.float32)
            table = cell_table(labels, _channels_last(image),
                               {int(k): float(s) for k, s in zip(label_ids, scores)})
        timer.times["total"] = time.perf_counter() - t_start
        return SegmentationResult(labels=labels, label_ids=np.asarray(label_ids, np.int64),
                                  boxes=np.asarray(boxes_img, np.float32).reshape(-1, 4),
                                  scores=scores, table=table, timings=timer.times, tiled=tiled,
                                  scale=scale)

    # ------------------------------------------------------------------ stages

    def _decoded(self, embeddings: np.ndarray, boxes: np.ndarray, box_image: np.ndarray,
                 timer: _Timer):
        """The mask decoder's chunks (kept box indices, logits, IoU), each timed as "decoder"."""
        chunks = decode_masks(self.backend.run, embeddings, boxes, box_image, self.chunk_size,
                              self.iou_threshold, size=self.size,
                              mask_threshold=self.mask_threshold, **self._window_kw)
        while True:
            with timer("decoder"):
                item = next(chunks, None)
            if item is None:
                return
            yield item

    def _segment_images(self, images: Sequence[np.ndarray],
                        user_boxes: Optional[Sequence[np.ndarray]], timer: _Timer,
                        inputs: Optional[Sequence[tuple]] = None,
                        check: Optional[Callable[[np.ndarray], bool]] = None,
                        ) -> Optional[list[_ImageSeg]]:
        """Whole-image stages for a batch of HxWx3 images (whole images or tiles).

        `inputs` holds already computed (encoder input, CellFinder input) pairs, one per image.
        """
        S = self.size
        with timer("preprocess"):
            prepared = (list(inputs) if inputs is not None else
                        [preprocess(img, S, self.has_model_cp)[:2] for img in images])
            enc_in = np.stack([p[0] for p in prepared])
        with timer("encoder"):
            embeddings = self.backend.run("encoder", {"image": enc_in})["embeddings"]

        if user_boxes is None:
            with timer("cellfinder"):
                finder_in = np.stack([p[1] for p in prepared])
                out = self.backend.run("cellfinder", {"image": finder_in})
            with timer("detect"):
                dets = [decode_detections(out["class_logits"][b], out["boxes"][b], S,
                                          self.bbox_threshold) for b in range(len(images))]
                prompts = [d.boxes for d in dets]
                det_scores = [d.scores for d in dets]
            if check is not None and not check(prompts[0]):
                self._last_prompts = prompts[0]
                return None
        else:
            prompts = [boxes_to_model_space(bx, img.shape[:2], S)
                       for bx, img in zip(user_boxes, images)]
            det_scores = [np.full(len(p), np.nan, np.float32) for p in prompts]
        del prepared

        n_per = [len(p) for p in prompts]
        all_boxes = (np.concatenate(prompts).astype(np.float32) if sum(n_per)
                     else np.zeros((0, 4), np.float32))
        box_image = np.repeat(np.arange(len(images), dtype=np.int64), n_per)
        first_box = np.concatenate([[0], np.cumsum(n_per)[:-1]]).astype(np.int64)

        # Labels 1..K per image in prompt order over the kept masks; later labels overwrite.
        raw = [np.zeros(img.shape[:2], dtype=np.int32) for img in images]
        next_label = np.ones(len(images), dtype=np.int64)
        label_box = [[] for _ in images]  # label k -> prompt index within its image
        if len(all_boxes):
            for kept, logits, _iou in self._decoded(embeddings, all_boxes, box_image, timer):
                kept = np.asarray(kept, dtype=np.int64)
                with timer("paste"):
                    owners = box_image[kept]
                    for b in np.unique(owners):
                        sel = np.nonzero(owners == b)[0]
                        new = next_label[b] + np.arange(len(sel))
                        next_label[b] += len(sel)
                        label_box[b].extend((kept[sel] - first_box[b]).tolist())
                        paste_masks(raw[b], logits[sel], new.astype(np.int32), S,
                                    self.mask_threshold)
        del embeddings

        results = []
        for b in range(len(images)):
            with timer("postprocess"):
                before = raw[b]
                if next_label[b] > 1:
                    after = fill_holes_and_remove_small(before.copy(), min_size=self.min_size)
                    after = np.asarray(after, dtype=np.int32)
                else:
                    after = before
                sources = label_sources(before, after)
                ids = np.array(sorted(sources), dtype=np.int64)
                prompt_idx = np.array([label_box[b][sources[int(v)] - 1] for v in ids],
                                      dtype=np.int64)
            boxes_s = (prompts[b][prompt_idx] if len(ids) else np.zeros((0, 4), np.float32))
            scores = (det_scores[b][prompt_idx] if len(ids) else np.zeros(0, np.float32))
            results.append(_ImageSeg(labels=after, label_ids=ids,
                                     boxes_s=np.asarray(boxes_s, np.float32).reshape(-1, 4),
                                     scores=np.asarray(scores, np.float32)))
        return results

    def _segment_tiled(self, img3: np.ndarray, boxes: Optional[np.ndarray], timer: _Timer):
        """Tiled segmentation (docs/design.md §2.10), tiles batched through every stage."""
        grid = tiling.tile_grid(img3.shape)
        tile_boxes = None
        if boxes is not None:
            # Each user box goes to the one tile whose core holds its centre (tile coordinates).
            tile_boxes = [[] for _ in range(len(grid))]
            for bx in boxes:
                t = grid.tile_of_point((bx[1] + bx[3]) / 2, (bx[0] + bx[2]) / 2)
                oy, ox = t.origin
                tile_boxes[t.index].append(bx - np.array([ox, oy, ox, oy], np.float32))
            tile_boxes = [np.asarray(tb, np.float32).reshape(-1, 4) for tb in tile_boxes]

        segs: list[_ImageSeg] = []
        cursor = [0]

        def segment_batch(tiles: list[np.ndarray]) -> list[np.ndarray]:
            start = cursor[0]
            cursor[0] += len(tiles)
            tb = None if tile_boxes is None else tile_boxes[start:start + len(tiles)]
            out = self._segment_images(tiles, tb, timer)
            segs.extend(out)
            return [s.labels for s in out]

        staged = sum(timer.times.values())
        t0 = time.perf_counter()
        stitched, grid = tiling.segment_tiled(img3, segment_batch, batch_size=self.batch_size,
                                              progress=self.progress)
        # segment_tiled times the tile stages through `timer`; the rest of its time is stitching.
        elapsed = time.perf_counter() - t0
        timer.times["stitch"] = timer.times.get("stitch", 0.0) + max(
            0.0, elapsed - (sum(timer.times.values()) - staged))
        with timer("stitch"):
            n = stitched.n_cells
            label_ids = np.arange(1, n + 1, dtype=np.int64)
            boxes_img = np.zeros((n, 4), np.float32)
            scores = np.zeros(n, np.float32)
            for i, (ti, local) in enumerate(stitched.sources):
                seg = segs[int(ti)]
                j = int(np.searchsorted(seg.label_ids, local))
                t = grid[int(ti)]
                th, tw = t.shape
                oy, ox = t.origin
                box = seg.boxes_s[j] * np.array([tw, th, tw, th], np.float32) / np.float32(self.size)
                boxes_img[i] = box + np.array([ox, oy, ox, oy], np.float32)
                scores[i] = seg.scores[j]
        return stitched.labels, label_ids, boxes_img, scores
