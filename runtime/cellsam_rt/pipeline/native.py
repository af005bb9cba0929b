"""Native-scale tiled segmentation: the `tile="auto"` path for images that do not fit the model's
input at the scale their objects need (docs/design.md §2.10 keeps the reference's tiling for
`tile="always"`).

The image is rescaled so that its objects come to the model's `object_diameter` and cut into
tiles of exactly the model's input size (nothing inside a tile is resized again). Neighbouring
tiles overlap by two object diameters; each detection belongs to the tile whose core holds its box
centre, and only there is its mask decoded and pasted into one label frame, so a cell at a seam
is decoded once, from a tile that sees all of it, and needs no stitching. Frame borders are
padded with zeros (no invented content). Tiles go through encoder and detector in batches while
a worker thread prepares the next batch; tiles with no pixel above the background noise are
skipped before the model sees them.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from cellsam_rt.stages import scale as sc
from cellsam_rt.stages.detect import decode_detections
from cellsam_rt.stages.masks import paste_masks
from cellsam_rt.stages.postprocess import fill_holes_and_remove_small, label_sources
from cellsam_rt.stages.preprocess import format_channels, preprocess

__all__ = ["segment_native", "estimate_scale", "detect_diameter", "probe_detections"]


def _pad_to(crop: np.ndarray, size: int, value: float = 0.0) -> np.ndarray:
    """A crop padded at its bottom/right to size x size with a constant (the background level:
    no content is invented, and normalisation sees no black frame the image does not have)."""
    h, w = crop.shape[:2]
    if h == size and w == size:
        return crop
    pad = [(0, size - h), (0, size - w)] + [(0, 0)] * (crop.ndim - 2)
    return np.pad(crop, pad, constant_values=value)


#: the scale search starts from the first estimate and from twice and half of it: an image can
#: look plausible at two scales (clusters of small nuclei at one, the nuclei at twice that), and
#: a distinct scale where the detector is more confident replaces the first start's
SCALE_HYPOTHESES = (1.0, 2.0, 0.5)
#: a refinement stops when a probe moves the scale by less than this factor; scales closer than
#: it are the same reading of the image
REFINE_TOLERANCE = 1.25


def probe_detections(seg, image: np.ndarray, channels, scale: float):
    """The detector's detections (model pixels) in the probe window of `image` at `scale`."""
    S = seg.size
    h, w = image.shape[:2]
    side = min(max(h, w), int(math.ceil(S / scale)))
    y, x = sc.probe_window(image, side)
    crop = image[y:y + side, x:x + side]
    crop = _pad_to(sc.rescale_image(crop, scale)[:S, :S], S, sc.background(crop).level)
    _, finder_in, _ = preprocess(crop, S, seg.has_model_cp, channels)
    out = seg.backend.run("cellfinder", {"image": finder_in[None]})
    return decode_detections(out["class_logits"][0], out["boxes"][0], S, seg.bbox_threshold)


def detect_diameter(seg, image: np.ndarray, channels, scale: float) -> tuple[float, float]:
    """(median detected object diameter in model pixels, confidence) of the probe window at
    `scale` (detector only). The confidence, mean detection score x log(1 + count), grows with
    surer and with more detections. Diameter NaN when it finds too few objects."""
    det = probe_detections(seg, image, channels, scale)
    n = len(det.scores)
    confidence = float(np.mean(det.scores)) * math.log1p(n) if n else 0.0
    return sc.box_diameter(det.boxes), confidence


def _refine(seg, image: np.ndarray, channels, scale: float, tries: int, target: float):
    """(scale, confidence) after up to `tries` probes from `scale`, each probe's estimate
    setting the next one's scale; None when the first probe finds too few objects."""
    confidence = 0.0
    for k in range(tries):
        d, c = detect_diameter(seg, image, channels, scale)
        if not math.isfinite(d) or d <= 0:
            if k == 0:
                return None
            break
        new = scale * target / d
        done = sc.within_tolerance(new / scale, REFINE_TOLERANCE)
        scale, confidence = new, c
        if done:
            break
    return scale, confidence


def whole_image_diameter(seg, image: np.ndarray, channels=None,
                         finder_in: Optional[np.ndarray] = None) -> tuple[float, float]:
    """Median detected object diameter of the whole-image pass, (model px, image px); NaN with
    too few detections. User boxes skip the detector, so it measures the objects for them too:
    they are decoded at the scale the segmentation would use, not at the whole-image scale.
    `finder_in`: the image's detector input when already prepared."""
    h, w = image.shape[:2]
    if finder_in is None:
        _, finder_in, _ = preprocess(format_channels(image, channels), seg.size, seg.has_model_cp)
    out = seg.backend.run("cellfinder", {"image": finder_in[None]})
    det = decode_detections(out["class_logits"][0], out["boxes"][0], seg.size, seg.bbox_threshold)
    return sc.box_diameter(det.boxes), sc.box_diameter(det.boxes, h / seg.size, w / seg.size)


def estimate_scale(seg, image: np.ndarray, channels, scale: float, tries: int = 2,
                   snap: bool = True) -> float:
    """Image-to-model scale that brings the objects to the model's object diameter: probes
    refined from `scale` and from SCALE_HYPOTHESES multiples of it; a scale other than the
    first start's is kept when it is distinct from it and the detector is surer there. With
    `snap`, a scale within the model's tolerance band of 1 becomes 1; without it, NaN when no
    probe finds enough objects to measure."""
    target = seg.model_dir.object_diameter
    tried = [_refine(seg, image, channels, scale * f, tries, target) for f in SCALE_HYPOTHESES]
    found = [r for r in tried if r is not None]
    if found:
        best = max(found, key=lambda r: r[1])
        first = tried[0]
        # Starts that end near the first one's scale read the image the same way (they differ
        # by the refinement's tolerance): only a distinct, surer reading replaces the first.
        keep_first = first is not None and sc.within_tolerance(best[0] / first[0],
                                                               REFINE_TOLERANCE)
        scale = first[0] if keep_first else best[0]
    elif not snap:
        return float("nan")  # nothing found to measure
    # Within the band the model was trained on, the image keeps its own scale (no resampling).
    return 1.0 if snap and sc.within_tolerance(scale) else scale


def _owned(boxes: np.ndarray, core, origin) -> np.ndarray:
    """Which S-space boxes of a tile at `origin` have their centre inside the tile's core."""
    y0, y1, x0, x1 = core
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 + origin[0]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 + origin[1]
    return (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)


def segment_native(seg, image: np.ndarray, channels, scale: float, timer,
                   boxes: Optional[np.ndarray] = None):
    """Segment a channels-last image at `scale` -> (labels HxW int, label ids, xyxy boxes, scores).

    `seg` is the Segmenter (backend, thresholds, window policy, batch size, progress); `boxes`
    are user prompts in image pixels (each goes to the tile whose core holds its centre).
    """
    S = seg.size
    h, w = image.shape[:2]
    with timer("rescale"):
        scaled = image if scale == 1.0 else sc.rescale_image(image, scale)
        layout = sc.tile_layout(scaled.shape[:2], S, sc.overlap_for(seg.model_dir.object_diameter))
        bg = sc.background(scaled)
    tiles = layout.tiles()
    signal = None
    if boxes is None:
        # Blank tiles of an image with signal elsewhere are skipped; a faint, noisy image in
        # which no tile clears the gate is segmented whole rather than not at all.
        with timer("preprocess"):
            signal = [sc.has_signal(_pad_to(scaled[y:y + S, x:x + S], S, bg.level), bg)
                      for y, x, _ in tiles]
        if not any(signal):
            signal = None
    user = None
    if boxes is not None:
        user = [[] for _ in tiles]
        for bx in np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32(scale):
            cy, cx = (bx[1] + bx[3]) / 2, (bx[0] + bx[2]) / 2
            for t, (y, x, (y0, y1, x0, x1)) in enumerate(tiles):
                if y0 <= cy < y1 and x0 <= cx < x1:
                    user[t].append(bx - np.array([x, y, x, y], np.float32))
                    break
        user = [np.asarray(u, np.float32).reshape(-1, 4) for u in user]

    def prepare(t: int):
        if user is not None and not len(user[t]):
            return None
        if signal is not None and not signal[t]:
            return None
        y, x, _ = tiles[t]
        crop = _pad_to(scaled[y:y + S, x:x + S], S, bg.level)
        enc, fin, _ = preprocess(crop, S, seg.has_model_cp, channels)
        return enc, fin

    fh, fw = layout.frame
    frame = np.zeros((fh, fw), dtype=np.int32)
    prompts: list[np.ndarray] = []     # per label (1-based index - 1): box in scaled pixels
    prompt_scores: list[float] = []
    batches = [list(range(i, min(i + seg.batch_size, len(tiles))))
               for i in range(0, len(tiles), seg.batch_size)]
    done = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(lambda b: [prepare(t) for t in b], batches[0]) if batches else None
        for k, batch in enumerate(batches):
            with timer("preprocess"):
                inputs = pending.result()
            pending = (pool.submit(lambda b: [prepare(t) for t in b], batches[k + 1])
                       if k + 1 < len(batches) else None)
            live = [(t, inp) for t, inp in zip(batch, inputs) if inp is not None]
            if live:
                _segment_batch(seg, live, tiles, user, frame, prompts, prompt_scores, timer)
            done += len(batch)
            if seg.progress is not None:
                seg.progress(done, len(tiles))

    with timer("postprocess"):
        before = frame[:layout.shape[0], :layout.shape[1]]
        after = before
        if prompts:
            min_size = max(1, round(seg.min_size * scale * scale)) if seg.min_size > 0 else 0
            after = np.asarray(fill_holes_and_remove_small(before.copy(), min_size=min_size),
                               dtype=np.int32)
        sources = label_sources(before, after)
        labels = sc.labels_to_shape(after, (h, w)) if scale != 1.0 else after
        ids = np.unique(labels)
        ids = ids[ids > 0].astype(np.int64)
        src = np.array([sources[int(v)] - 1 for v in ids], dtype=np.int64)
        boxes_img = (np.asarray(prompts, np.float32)[src] / np.float32(scale) if len(ids)
                     else np.zeros((0, 4), np.float32))
        scores = (np.asarray(prompt_scores, np.float32)[src] if len(ids)
                  else np.zeros(0, np.float32))
    return labels, ids, boxes_img, scores


def _segment_batch(seg, live, tiles, user, frame, prompts, prompt_scores, timer) -> None:
    """Encoder, detector, windowed decoding and paste for one batch of tiles (in place)."""
    S = seg.size
    with timer("encoder"):
        emb = seg.backend.run("encoder", {"image": np.stack([inp[0] for _, inp in live])})
        emb = emb["embeddings"]
    per_tile = []
    if user is None:
        with timer("cellfinder"):
            out = seg.backend.run("cellfinder", {"image": np.stack([inp[1] for _, inp in live])})
        with timer("detect"):
            for b, (t, _) in enumerate(live):
                det = decode_detections(out["class_logits"][b], out["boxes"][b], S,
                                        seg.bbox_threshold)
                y, x, core = tiles[t]
                keep = _owned(det.boxes, core, (y, x))
                per_tile.append((det.boxes[keep], det.scores[keep]))
    else:
        per_tile = [(user[t], np.full(len(user[t]), np.nan, np.float32)) for t, _ in live]
    n_per = [len(p[0]) for p in per_tile]
    if not sum(n_per):
        return
    all_boxes = np.concatenate([p[0] for p in per_tile]).astype(np.float32)
    all_scores = np.concatenate([p[1] for p in per_tile]).astype(np.float32)
    box_tile = np.repeat(np.arange(len(live), dtype=np.int64), n_per)
    for kept, logits, _ in seg._decoded(emb, all_boxes, box_tile, timer):
        with timer("paste"):
            for b in np.unique(box_tile[kept]):
                sel = np.flatnonzero(box_tile[kept] == b)
                y, x, _ = tiles[live[b][0]]
                first = len(prompts) + 1
                for i in kept[sel]:
                    prompts.append(all_boxes[i] + np.array([x, y, x, y], np.float32))
                    prompt_scores.append(float(all_scores[i]))
                new = np.arange(first, first + len(sel), dtype=np.int32)
                paste_masks(frame[y:y + S, x:x + S], logits[sel], new, S, seg.mask_threshold)
