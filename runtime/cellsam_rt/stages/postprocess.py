"""Label-image postprocessing (docs/design.md §2.8) and the per-cell measurement table."""
from __future__ import annotations

from typing import Mapping, Optional, Tuple, Union

import numpy as np
from scipy import ndimage

from cellsam_rt.io.outputs import label_dtype

DEFAULT_MIN_SIZE = 25


def fill_holes_and_remove_small(labels: np.ndarray, min_size: int = DEFAULT_MIN_SIZE) -> np.ndarray:
    """The reference's cellpose-derived hole filling and small-mask removal, in place, quirks kept.

    Labels are visited in value order using bounding boxes taken once up front. A label with fewer
    than min_size pixels (what is left of it) is erased; otherwise its holes are filled and it is
    renumbered j+1 (j = labels kept so far). A filled hole overwrites any label inside it, so a
    later label can shrink or vanish, and numbering can have gaps. Exactly the reference's result.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D label image, got {labels.ndim}-D")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"label image must be integer, got {labels.dtype}")
    kept = 0
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        view = labels[box]  # writes land in `labels`
        mine = view == value
        size = int(mine.sum())
        if min_size > 0 and size < min_size:
            view[mine] = 0
            continue
        if size == 0:
            continue
        if mine.ndim == 3:
            mine = np.stack([ndimage.binary_fill_holes(plane) for plane in mine])
        else:
            mine = ndimage.binary_fill_holes(mine)
        kept += 1
        view[mine] = kept
    return labels


def largest_parts(labels: np.ndarray) -> np.ndarray:
    """Each label kept as its largest 8-connected piece, in place: specks a mask leaves beside
    its object, or the far part of one cut in two by a later mask, are cleared."""
    import cv2

    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        view = labels[box]
        mine = (view == value).view(np.uint8)
        n, parts = cv2.connectedComponents(mine, connectivity=8)
        if n > 2:
            sizes = np.bincount(parts.ravel())
            sizes[0] = 0
            view[(parts > 0) & (parts != int(sizes.argmax()))] = 0
    return labels


#: a mask holding less than this share of its convex hull is a fragment, not a cell (outline
#: "contrast", the default model's): the crescent a neighbour's mask leaves of an overlapped
#: one, a sliver between nuclei
MIN_SOLIDITY = 0.65
#: so is a mask of less than this share of the image's median mask area: a speck that overlaps
#: and edge redrawing left after the reference's size filter
MIN_AREA_SHARE = 0.1


def _areas_and_hulls(labels: np.ndarray) -> dict[int, tuple[int, int]]:
    """Each label's pixel count and the pixel count of its filled convex hull."""
    import cv2

    out = {}
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mine = labels[box] == value
        ys, xs = np.nonzero(mine)
        hull = np.zeros(mine.shape, np.uint8)
        # Hull corners are pixel centres, so the filled hull holds every pixel of the mask.
        cv2.fillConvexPoly(hull, cv2.convexHull(np.stack([xs, ys], 1).astype(np.int32)), 1)
        out[value] = (len(ys), max(int(np.count_nonzero(hull)), 1))
    return out


def solidity(labels: np.ndarray) -> dict[int, float]:
    """Each label's pixel count over the pixel count of its convex hull (1 for a convex mask)."""
    return {v: area / hull for v, (area, hull) in _areas_and_hulls(labels).items()}


def drop_fragments(labels: np.ndarray, min_solidity: float = MIN_SOLIDITY,
                   min_area_share: float = MIN_AREA_SHARE) -> np.ndarray:
    """`labels` without the masks whose solidity is below `min_solidity`, then without those
    smaller than `min_area_share` of the median area of the masks left; in place."""
    shapes = _areas_and_hulls(labels)
    left = {v: area for v, (area, hull) in shapes.items() if area >= min_solidity * hull}
    floor = min_area_share * np.median(list(left.values())) if left else 0.0
    drop = [v for v in shapes if v not in left or left[v] < floor]
    if drop:
        labels[np.isin(labels, drop)] = 0
    return labels


def label_sources(before: np.ndarray, after: np.ndarray) -> dict[int, int]:
    """For each label left by hole filling, the pre-fill label it was renumbered from.

    The reference's hole filling renumbers survivors and lets a filled hole take over other
    labels' pixels, so a label's pixels can hold several old labels. The pixels on a label's
    outline always belong to its own mask (hole pixels never touch the outside), so the old label
    that dominates the outline is the source.
    """
    out: dict[int, int] = {}
    if not after.any():
        return out
    edge = np.zeros(after.shape, dtype=bool)
    # Outline: pixels with a 4-neighbour of another value, or on the image border.
    edge[:-1] |= after[:-1] != after[1:]
    edge[1:] |= after[1:] != after[:-1]
    edge[:, :-1] |= after[:, :-1] != after[:, 1:]
    edge[:, 1:] |= after[:, 1:] != after[:, :-1]
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    sel = edge & (after > 0) & (before > 0)
    a = after[sel].astype(np.int64)
    b = before[sel].astype(np.int64)
    if a.size:
        base = int(b.max()) + 1
        keys, counts = np.unique(a * base + b, return_counts=True)
        ka, kb = keys // base, keys % base
        # Highest count per new label (ties: smallest old label, by the stable sort).
        order = np.lexsort((kb, -counts, ka))
        ka, kb = ka[order], kb[order]
        first = np.r_[True, ka[1:] != ka[:-1]]
        out = {int(x): int(y) for x, y in zip(ka[first], kb[first])}
    # A label whose whole outline was overwritten (cannot really happen): take any pixel.
    for v in np.unique(after):
        if v and int(v) not in out:
            vals = before[(after == v) & (before > 0)]
            out[int(v)] = int(vals[0]) if vals.size else 0
    return out


def relabel_sequential(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Renumber labels to 1..n keeping their order; returns (labels in label_dtype(n), old_ids).

    old_ids[new] is the original value of new label `new` (old_ids[0] == 0), so per-label data
    keyed by the old values can follow the renumbering.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"label image must be integer, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("label image has negative values")
    top = int(labels.max()) if labels.size else 0
    if top <= 4 * labels.size + 65536:
        # Dense value range: a presence table and a lookup table are O(pixels), no sort.
        present = np.bincount(labels.ravel(), minlength=top + 1).astype(bool)
        present[0] = False
        old_ids = np.concatenate([[0], np.flatnonzero(present)]).astype(np.int64)
        lut = np.zeros(top + 1, dtype=label_dtype(old_ids.size - 1))
        lut[old_ids] = np.arange(old_ids.size, dtype=lut.dtype)
        return lut[labels], old_ids
    values, inverse = np.unique(labels, return_inverse=True)
    if values[0] != 0:
        values = np.concatenate([[0], values])
        inverse = inverse + 1
    out = inverse.reshape(labels.shape).astype(label_dtype(values.size - 1))
    return out, values.astype(np.int64)


ScoreSource = Union[None, Mapping[int, float], np.ndarray]


def _scores_for(ids: np.ndarray, scores_by_label: ScoreSource) -> np.ndarray:
    """Scores of the given label values (NaN where unknown)."""
    out = np.full(ids.shape, np.nan, dtype=np.float64)
    if scores_by_label is None:
        return out
    if isinstance(scores_by_label, Mapping):
        for i, lab in enumerate(ids):
            if int(lab) in scores_by_label:
                out[i] = float(scores_by_label[int(lab)])
        return out
    table = np.asarray(scores_by_label, dtype=np.float64).reshape(-1)  # indexed by label value
    inside = ids < table.size
    out[inside] = table[ids[inside]]
    return out


def cell_table(labels: np.ndarray, image_hw_c: Optional[np.ndarray] = None,
               scores_by_label: ScoreSource = None) -> np.ndarray:
    """One row per label (structured array): area, centroid, bbox, score, mean intensity per channel.

    bbox_max_* are exclusive (as skimage regionprops' bbox); centroids are in pixel coordinates.
    scores_by_label maps a label value to its score (dict or array indexed by label; NaN if absent).
    Computed with a few whole-image passes (bincount / find_objects), not one pass per label.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {labels.shape}")
    channels = 0
    if image_hw_c is not None:
        image_hw_c = np.asarray(image_hw_c)
        if image_hw_c.ndim == 2:
            image_hw_c = image_hw_c[..., None]
        if image_hw_c.shape[:2] != labels.shape:
            raise ValueError(f"image {image_hw_c.shape} does not match labels {labels.shape}")
        channels = image_hw_c.shape[2]
    top = int(labels.max()) if labels.size else 0
    # Accumulate per-label sums over row blocks: a few bincounts, memory bounded by the block.
    nsums = 3 + channels  # count, sum of rows, sum of cols, sum of each channel
    sums = np.zeros((nsums, top + 1), dtype=np.float64)
    height, width = labels.shape
    block = max(1, (1 << 22) // max(width, 1))
    col_index = np.arange(width, dtype=np.float64)
    for r0 in range(0, height, block):
        r1 = min(r0 + block, height)
        flat = labels[r0:r1].ravel().astype(np.intp)
        sums[0] += np.bincount(flat, minlength=top + 1)
        row_w = np.repeat(np.arange(r0, r1, dtype=np.float64), width)
        sums[1] += np.bincount(flat, row_w, minlength=top + 1)
        sums[2] += np.bincount(flat, np.tile(col_index, r1 - r0), minlength=top + 1)
        for c in range(channels):
            vals = image_hw_c[r0:r1, :, c].ravel().astype(np.float64)
            sums[3 + c] += np.bincount(flat, vals, minlength=top + 1)
    ids = np.flatnonzero(sums[0])
    ids = ids[ids > 0]
    fields = [("label", np.int64), ("area", np.int64), ("centroid_y", np.float64),
              ("centroid_x", np.float64), ("bbox_min_row", np.int64), ("bbox_min_col", np.int64),
              ("bbox_max_row", np.int64), ("bbox_max_col", np.int64), ("score", np.float64)]
    fields += [(f"mean_intensity_{c}", np.float64) for c in range(channels)]
    table = np.zeros(ids.size, dtype=fields)
    if ids.size == 0:
        return table
    area = sums[0, ids]
    table["label"] = ids
    table["area"] = area.astype(np.int64)
    table["centroid_y"] = sums[1, ids] / area
    table["centroid_x"] = sums[2, ids] / area
    boxes = ndimage.find_objects(labels, max_label=top)
    box = np.array([(b[0].start, b[1].start, b[0].stop, b[1].stop) for b in (boxes[i - 1] for i in ids)],
                   dtype=np.int64)
    table["bbox_min_row"], table["bbox_min_col"] = box[:, 0], box[:, 1]
    table["bbox_max_row"], table["bbox_max_col"] = box[:, 2], box[:, 3]
    table["score"] = _scores_for(ids, scores_by_label)
    for c in range(channels):
        table[f"mean_intensity_{c}"] = sums[3 + c, ids] / area
    return table
