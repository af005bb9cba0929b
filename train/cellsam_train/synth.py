"""Procedural microscopy-like images with instance labels, for training the small default model.

Each sample is drawn from its own seed (`generate(seed)` is deterministic) and is one of:

- "nuclei": fluorescent nuclei, one channel (DSB-like): ellipses and blobby perturbed shapes,
  isolated, clustered, touching and overlapping, varied size, brightness and texture.
- "cells": whole cells (tissue-like sheets of touching cells from a size-weighted Voronoi
  partition clipped to blobs), one channel of cytoplasm or membrane stain.
- "cells2": the same cells as two channels (nuclear, whole-cell), labelled by whole cell.

Images come out as uint8 or uint16 (random bit depth and gain, like real acquisitions) with a
smooth uneven background, PSF blur, Poisson shot noise and read noise, plus unlabelled debris.
Sizes are drawn in *model space* (after the runtime's resize to `model_size`), so the model sees
cells of 8-60 px whatever the native canvas size is.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

__all__ = ["SynthSample", "KINDS", "SYNTH_VERSION", "generate", "blob_polygon"]

KINDS = ("nuclei", "cells", "cells2")
_KIND_WEIGHTS = (0.6, 0.15, 0.25)


@dataclass
class SynthSample:
    """One synthetic image: pixels (HxW or HxWx2 = nuclear, whole-cell), labels (HxW int32)."""

    image: np.ndarray
    labels: np.ndarray
    kind: str
    seed: int

    @property
    def num_cells(self) -> int:
        """Number of labelled instances."""
        return int(len(np.unique(self.labels)) - (1 if (self.labels == 0).any() else 0))


def blob_polygon(rng: np.random.Generator, radius: float, elongation: float, wobble: float,
                 n: int = 48) -> np.ndarray:
    """Vertices [n,2] (x, y, centred at 0) of an ellipse with a smooth random radial perturbation."""
    theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        amp = wobble * rng.normal() / k
        r += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.55, 1.6) * radius
    a = np.sqrt(elongation)
    x, y = r * np.cos(theta) * a, r * np.sin(theta) / a
    phi = rng.uniform(0, np.pi)
    c, s = np.cos(phi), np.sin(phi)
    return np.stack([c * x - s * y, s * x + c * y], axis=1)


def _raster(poly: np.ndarray, cx: float, cy: float, h: int, w: int):
    """Rasterise a polygon at (cx, cy); returns (y0, x0, local bool mask) or None when off-canvas."""
    pts = poly + np.array([cx, cy])
    x0 = max(int(np.floor(pts[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(pts[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(pts[:, 0].max())) + 2, w)
    y1 = min(int(np.ceil(pts[:, 1].max())) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return None
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    shift = 4  # sub-pixel vertex precision
    p = np.round((pts - np.array([x0, y0])) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(local, [p], 1, lineType=cv2.LINE_8, shift=shift)
    return y0, x0, local.astype(bool)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with features of about `scale` px."""
    scale = max(scale, 1.0)
    gh, gw = max(int(h / scale) + 2, 2), max(int(w / scale) + 2, 2)
    field = cv2.resize(rng.standard_normal((gh, gw)).astype(np.float32), (w, h),
                       interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _place_centres(rng: np.random.Generator, h: int, w: int, radii: np.ndarray,
                   min_sep: float, clustered: bool,
                   existing: list | None = None) -> list[tuple[float, float, float]]:
    """Rejection-sample centres so that centre distance >= min_sep * (r_i + r_j)."""
    placed: list[tuple[float, float, float]] = []
    old = np.asarray(existing or [], np.float64).reshape(-1, 3)
    cxs, cys, rs = old[:, 0].copy(), old[:, 1].copy(), old[:, 2].copy()
    clusters = None
    if clustered:
        k = int(rng.integers(1, 6))
        clusters = np.stack([rng.uniform(0, w, k), rng.uniform(0, h, k),
                             rng.uniform(0.1, 0.35, k) * min(h, w)], axis=1)
    for r in radii:
        for _ in range(25):
            if clusters is not None and rng.random() < 0.8:
                c = clusters[rng.integers(len(clusters))]
                x, y = rng.normal(c[0], c[2]), rng.normal(c[1], c[2])
            else:
                x, y = rng.uniform(-0.3 * r, w + 0.3 * r), rng.uniform(-0.3 * r, h + 0.3 * r)
            if not (-0.5 * r <= x <= w + 0.5 * r and -0.5 * r <= y <= h + 0.5 * r):
                continue
            if len(rs) and np.any(np.hypot(cxs - x, cys - y) < min_sep * (rs + r)):
                continue
            placed.append((x, y, r))
            cxs, cys, rs = np.append(cxs, x), np.append(cys, y), np.append(rs, r)
            break
    return placed


def _canvas(rng: np.random.Generator, model_size: int) -> tuple[int, int, float]:
    """Native canvas (h, w) and the native px per model px along the mean axis."""
    h = int(rng.integers(model_size // 2, int(model_size * 1.6)))
    aspect = float(np.exp(rng.uniform(-0.35, 0.35))) if rng.random() < 0.5 else 1.0
    w = int(np.clip(round(h * aspect), model_size // 2, int(model_size * 1.8)))
    return h, w, 0.5 * (h + w) / model_size


def _object_texture(rng: np.random.Generator, local: np.ndarray, style: dict) -> np.ndarray:
    """Multiplicative intensity pattern inside one object (dome, rim, chromatin, nucleoli)."""
    hh, ww = local.shape
    dist = cv2.distanceTransform(local.astype(np.uint8), cv2.DIST_L2, 3)
    depth = dist / (dist.max() + 1e-6)
    t = np.ones((hh, ww), np.float32)
    t *= 1.0 + style["dome"] * (depth - 0.5)
    t *= 1.0 + style["rim"] * np.exp(-dist / 1.5)
    if style["chromatin"] > 0:
        t *= np.clip(1.0 + style["chromatin"] * _smooth_noise(rng, hh, ww, style["grain"]), 0.2, None)
    if rng.random() < style["p_spots"]:
        for _ in range(int(rng.integers(1, 4))):
            ys, xs = np.nonzero(depth > 0.4)
            if len(ys) == 0:
                break
            i = rng.integers(len(ys))
            rad = max(1.0, 0.12 * dist.max() * rng.uniform(0.5, 1.5))
            yy, xx = np.ogrid[:hh, :ww]
            spot = np.exp(-((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * rad ** 2))
            t *= 1.0 + rng.uniform(-0.6, 1.2) * spot
    return np.clip(t, 0.05, None)


def _draw_objects(rng: np.random.Generator, h: int, w: int, placed, scale_px: float,
                  elong_range: tuple[float, float], wobble: float):
    """Masks of blobby objects at the placed centres, keeping only those mostly visible."""
    objects = []
    labels = np.zeros((h, w), np.int32)
    for x, y, r in placed:
        poly = blob_polygon(rng, r, rng.uniform(*elong_range), wobble * rng.uniform(0.3, 1.5))
        ras = _raster(poly, x, y, h, w)
        if ras is None or ras[2].sum() < 6:
            continue
        objects.append(ras)
    # Later objects lie on top; an object left with < 55 % of its pixels is dropped entirely
    # (otherwise a sliver would be labelled that a human annotator could not see).
    keep = []
    for i, (y0, x0, m) in enumerate(objects):
        sl = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
        labels[sl][m] = i + 1
    for i, (y0, x0, m) in enumerate(objects):
        sl = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
        visible = (labels[sl][m] == i + 1).sum()
        if visible >= 0.55 * m.sum() and visible >= max(6.0, 0.15 * scale_px ** 2 * 20):
            keep.append(i)
    labels[:] = 0
    kept = []
    for i in keep:
        y0, x0, m = objects[i]
        kept.append(objects[i])
        labels[y0:y0 + m.shape[0], x0:x0 + m.shape[1]][m] = len(kept)
    return kept, labels


def _fluorescence(rng: np.random.Generator, h: int, w: int, objects, labels: np.ndarray,
                  base: float, spread: float, style: dict, edge_sigma,
                  gains=None) -> np.ndarray:
    """Signal image: each object adds its (textured, soft-edged) intensity; overlaps add up.

    `edge_sigma` is one blur for all objects or one per object (focus varies with depth)."""
    img = np.zeros((h, w), np.float32)
    per_object = np.ndim(edge_sigma) > 0
    for k, (y0, x0, m) in enumerate(objects):
        t = _object_texture(rng, m, style)
        if gains is not None:
            t = t * np.float32(gains[k])
        sigma = float(edge_sigma[k]) if per_object else float(edge_sigma)
        add_object(img, y0, x0, m, t, sigma, (base, float(np.exp(rng.normal(0, spread)))))
    return img


def add_object(img: np.ndarray, y0: int, x0: int, mask: np.ndarray, texture: np.ndarray,
               sigma: float, gains) -> None:
    """Add one object's texture inside its mask, edges blurred by `sigma`, to `img` (in place),
    multiplied by each of `gains` in turn (one product after another, as the generators did)."""
    soft = mask.astype(np.float32)
    if sigma > 0.2:
        pad = int(3 * sigma) + 1
        soft = cv2.GaussianBlur(np.pad(soft, pad), (0, 0), sigma)
        texture = np.pad(texture, pad, mode="edge")
        y0, x0 = y0 - pad, x0 - pad
    val = soft * texture
    for g in gains:
        val = val * g
    h, w = img.shape
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + val.shape[0], h), min(x0 + val.shape[1], w)
    img[ya:yb, xa:xb] += val[ya - y0:yb - y0, xa - x0:xb - x0]


def _random_style(rng: np.random.Generator, radius: float) -> dict:
    """Per-image appearance of objects."""
    return {
        "dome": rng.uniform(-0.2, 0.8),
        "rim": rng.uniform(-0.2, 0.6) if rng.random() < 0.4 else 0.0,
        "chromatin": rng.uniform(0.0, 0.45),
        "grain": rng.uniform(1.0, max(1.5, radius / 3)),
        "p_spots": rng.uniform(0, 0.7),
    }


def _debris(rng: np.random.Generator, img: np.ndarray, scale_px: float, level: float) -> None:
    """Unlabelled clutter: tiny bright specks and faint out-of-focus haze blobs (in place)."""
    h, w = img.shape
    for _ in range(int(rng.poisson(rng.uniform(0, 6)))):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        rad = rng.uniform(0.6, 2.0) * scale_px
        yy, xx = np.ogrid[:h, :w]
        img += level * rng.uniform(0.2, 1.0) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * rad ** 2))
    for _ in range(int(rng.poisson(rng.uniform(0, 2)))):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        rad = rng.uniform(10, 30) * scale_px
        yy, xx = np.ogrid[:h, :w]
        img += level * rng.uniform(0.03, 0.12) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * rad ** 2))


def _acquire(rng: np.random.Generator, signal: np.ndarray, scale_px: float, dtype,
             version: int = 1) -> np.ndarray:
    """Camera model: PSF blur, uneven background, shot and read noise, gain and bit depth."""
    h, w = signal.shape
    psf = rng.uniform(0.0, 1.5) * scale_px
    if version >= 3 and rng.random() < 0.4:
        psf = rng.uniform(1.0, 2.5) * scale_px  # widefield optics: soft edges everywhere
    img = cv2.GaussianBlur(signal, (0, 0), psf) if psf > 0.3 else signal.copy()
    level = rng.uniform(0.0, 0.15)
    if version >= 2 and rng.random() < 0.4:
        level = rng.uniform(0.15, 0.6)  # low-contrast widefield: strong out-of-focus background
    bg = level * (1 + rng.uniform(0, 0.6) * _smooth_noise(rng, h, w, rng.uniform(50, 300)))
    img = img + np.clip(bg, 0, None).astype(np.float32)
    photons = float(np.exp(rng.uniform(np.log(15), np.log(3000))))
    img = rng.poisson(np.clip(img, 0, None) * photons).astype(np.float32) / photons
    img += rng.normal(0, rng.uniform(0.0, 0.03), img.shape).astype(np.float32)
    img = np.clip(img, 0, None)
    top = 255 if dtype == np.uint8 else int(rng.choice([4095, 16383, 65535]))
    gain = top * rng.uniform(0.25, 0.9) / max(float(np.percentile(img, 99.9)), 1e-3)
    return np.clip(np.round(img * gain), 0, top).astype(dtype)


def _add_condensed(rng: np.random.Generator, h: int, w: int, placed, objects, labels: np.ndarray,
                   gains: list, mean_d: float, scale_px: float):
    """A few small, elongated, much brighter nuclei (mitotic/apoptotic chromatin), as real nuclear
    stains show; they are cells too and are labelled."""
    k = int(rng.integers(1, 4) + rng.uniform(0, 0.08) * len(placed))
    radii = 0.5 * mean_d * rng.uniform(0.3, 0.7, k)
    extra = _place_centres(rng, h, w, radii, min_sep=1.0, clustered=False, existing=placed)
    new_objs, _ = _draw_objects(rng, h, w, extra, scale_px, (1.3, 3.0), wobble=0.2)
    objects, gains = list(objects), list(gains)
    for (y0, x0, m) in new_objs:
        sl = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
        if (labels[sl][m] > 0).mean() > 0.2:
            continue  # would mostly hide or be hidden by a nucleus already there
        objects.append((y0, x0, m))
        gains.append(float(rng.uniform(2.5, 6.0)))
        labels[sl][m] = len(objects)
    # Relabel 1..K in order of the object list, dropping nuclei the new ones hid too much.
    keep_objs, keep_gains = [], []
    out = np.zeros_like(labels)
    for i, (y0, x0, m) in enumerate(objects):
        sl = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
        vis = labels[sl] == i + 1
        if (vis & m).sum() >= 0.55 * m.sum():
            keep_objs.append((y0, x0, m))
            keep_gains.append(gains[i])
            out[sl][vis & m] = len(keep_objs)
    return keep_objs, out, keep_gains


def _nuclei(rng: np.random.Generator, model_size: int, version: int = 1):
    """Fluorescent nuclei, one channel (version 2: dim subpopulations, per-nucleus defocus,
    low-contrast backgrounds; version 3: also smooth, evenly stained, soft-edged nuclei)."""
    h, w, scale_px = _canvas(rng, model_size)
    mean_d = float(np.exp(rng.uniform(np.log(9), np.log(55)))) * scale_px
    n_target = int(rng.uniform(0.04, 0.55) * h * w / (np.pi * mean_d ** 2 / 4))
    n_target = int(np.clip(n_target, 1, 450))
    radii = 0.5 * mean_d * np.exp(rng.normal(0, rng.uniform(0.08, 0.3), n_target))
    placed = _place_centres(rng, h, w, radii, min_sep=rng.uniform(0.65, 1.05), clustered=rng.random() < 0.4)
    objects, labels = _draw_objects(rng, h, w, placed, scale_px, (1.0, rng.uniform(1.05, 2.2)),
                                    wobble=rng.uniform(0.0, 0.5))
    gains = [1.0] * len(objects)
    if rng.random() < 0.5:
        objects, labels, gains = _add_condensed(rng, h, w, placed, objects, labels, gains,
                                                mean_d, scale_px)
    style = _random_style(rng, 0.5 * mean_d)
    spread = rng.uniform(0.1, 0.6)
    edge_sigma = rng.uniform(0.0, 1.2) * scale_px
    if version >= 3 and rng.random() < 0.5:
        # Smooth, evenly stained nuclei (Hoechst/DAPI at low magnification): little chromatin
        # texture, a dome-shaped profile and soft edges; texture alone must not define a nucleus.
        style.update(chromatin=rng.uniform(0.0, 0.1), p_spots=0.0, rim=0.0,
                     dome=rng.uniform(0.2, 0.9))
        edge_sigma = rng.uniform(0.5, 2.0) * scale_px
    if version >= 2:
        spread = rng.uniform(0.1, 0.8)
        if rng.random() < 0.35:
            # A dim subpopulation (cell-cycle stage, weaker staining) next to bright nuclei.
            dim = rng.random(len(gains)) < rng.uniform(0.1, 0.4)
            gains = [g * (rng.uniform(0.25, 0.6) if d else 1.0) for g, d in zip(gains, dim)]
        if rng.random() < 0.4:
            # Nuclei at different depths: each one blurred by its own amount, still labelled.
            edge_sigma = edge_sigma + rng.uniform(0.0, 2.5, len(objects)) * scale_px
    signal = _fluorescence(rng, h, w, objects, labels, 1.0, spread, style,
                           edge_sigma=edge_sigma, gains=gains)
    _debris(rng, signal, scale_px, 1.0)
    dtype = np.uint8 if rng.random() < 0.4 else np.uint16
    return _acquire(rng, signal, scale_px, dtype, version), labels


def _cell_sheet(rng: np.random.Generator, h: int, w: int, scale_px: float):
    """Touching whole cells: a size-weighted Voronoi partition clipped to each cell's blob."""
    mean_d = float(np.exp(rng.uniform(np.log(18), np.log(70)))) * scale_px
    n_target = int(np.clip(rng.uniform(0.15, 0.9) * h * w / (np.pi * mean_d ** 2 / 4), 1, 300))
    radii = 0.5 * mean_d * np.exp(rng.normal(0, rng.uniform(0.1, 0.3), n_target))
    placed = _place_centres(rng, h, w, radii, min_sep=rng.uniform(0.45, 0.8), clustered=rng.random() < 0.5)
    best = np.full((h, w), np.inf, np.float32)
    labels = np.zeros((h, w), np.int32)
    seeds = []
    for i, (x, y, r) in enumerate(placed):
        poly = blob_polygon(rng, r * rng.uniform(1.0, 1.3), rng.uniform(1.0, 2.0), rng.uniform(0.1, 0.6))
        ras = _raster(poly, x, y, h, w)
        if ras is None:
            continue
        y0, x0, m = ras
        yy, xx = np.mgrid[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
        score = (np.hypot(yy - y, xx - x) / r).astype(np.float32)
        sl = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
        win = m & (score < best[sl])
        best[sl][win] = score[win]
        labels[sl][win] = len(seeds) + 1
        seeds.append((x, y, r))
    # Drop fragments: keep each label's largest part, and only cells of reasonable size.
    out = np.zeros_like(labels)
    kept = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        x, y, r = seeds[k - 1]
        m = labels[sl] == k
        n, comp, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=4)
        big = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        m = comp == big
        if m.sum() < max(12.0, 0.25 * np.pi * r * r * 0.5):
            continue
        kept.append((x, y, r))
        out[sl][m] = len(kept)
    return out, kept, mean_d


def _cells(rng: np.random.Generator, model_size: int, two_channel: bool, acquire=None):
    """Whole cells: cytoplasm or membrane stain, optionally with a nuclear channel.

    `acquire(rng, signal, scale_px, dtype)` is the camera model (default: version 1's)."""
    acquire = acquire or _acquire
    h, w, scale_px = _canvas(rng, model_size)
    labels, seeds, mean_d = _cell_sheet(rng, h, w, scale_px)
    style = _random_style(rng, 0.5 * mean_d)
    membrane = rng.random() < 0.35
    cell_sig = np.zeros((h, w), np.float32)
    nuclei_objs = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        x, y, r = seeds[k - 1]
        local = labels[sl] == k
        tex = _object_texture(rng, local, {**style, "p_spots": 0.0})
        level = float(np.exp(rng.normal(0, 0.35)))
        cell_sig[sl][local] += (level * tex)[local]
        # A nucleus inside each cell (for the nuclear channel and a dimmer hole in cytoplasm).
        poly = blob_polygon(rng, r * rng.uniform(0.3, 0.55), rng.uniform(1.0, 1.6), 0.3)
        ras = _raster(poly, x + rng.normal(0, 0.15 * r), y + rng.normal(0, 0.15 * r), h, w)
        if ras is not None:
            ny0, nx0, nm = ras
            nm = nm & (labels[ny0:ny0 + nm.shape[0], nx0:nx0 + nm.shape[1]] == k)
            if nm.sum() >= 4:
                nuclei_objs.append((ny0, nx0, nm))
    edges = (cv2.morphologyEx(labels.astype(np.float32), cv2.MORPH_GRADIENT, np.ones((3, 3))) > 0)
    if membrane:
        thick = max(1.0, 0.8 * scale_px)
        mem = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), thick) * 2.5
        cell_sig = 0.25 * cell_sig + mem * (labels > 0)
    else:
        # Cell borders are darker seams, as where two cytoplasms meet.
        cell_sig *= np.where(edges, rng.uniform(0.3, 0.9), 1.0).astype(np.float32)
    for (ny0, nx0, nm) in nuclei_objs:
        sl = (slice(ny0, ny0 + nm.shape[0]), slice(nx0, nx0 + nm.shape[1]))
        cell_sig[sl][nm] *= rng.uniform(0.4, 1.1)
    _debris(rng, cell_sig, scale_px, 1.0)
    edge_sigma = rng.uniform(0.0, 1.0) * scale_px
    dtype = np.uint8 if rng.random() < 0.4 else np.uint16
    whole = acquire(rng, cell_sig, scale_px, dtype)
    if not two_channel:
        return whole, labels
    nuc_style = _random_style(rng, 0.25 * mean_d)
    nuc_sig = _fluorescence(rng, h, w, nuclei_objs, labels, 1.0, 0.3, nuc_style, edge_sigma)
    nuc = acquire(rng, nuc_sig, scale_px, dtype)
    return np.stack([nuc, whole], axis=-1), labels


SYNTH_VERSION = 3
_KIND_WEIGHTS_V4 = (0.7, 0.1, 0.2)


def generate(seed: int, kind: str | None = None, model_size: int = 512,
             version: int = SYNTH_VERSION, regime: str | None = None,
             kinds: tuple[str, ...] = KINDS) -> SynthSample:
    """One seeded synthetic image with instance labels (`kind` None draws it from the seed).

    `version` 1 is the generator the first training stage used; 2 adds dim subpopulations,
    per-nucleus defocus and low-contrast backgrounds to the nuclei images; 3 adds smooth,
    evenly stained, soft-edged nuclei and stronger widefield blur; 4 broadens the nuclei (sizes,
    chromatin, nucleoli, mitotic and apoptotic shapes, dense clusters, illumination, sCMOS
    noise, inverted contrast; `cellsam_train.synth_v4`); 5 adds unlabelled cytoplasmic haze
    around nuclei (bleed-through, autofluorescence). `regime` (version 4 or 5, a name of
    `synth_v4.REGIMES`) forces one kind of image, for held-out test sets. `kinds` limits the
    kinds drawn (their weights renormalised; one draw either way, so the rest of the seed's
    image is unchanged for a kind both allow)."""
    if version not in (1, 2, 3, 4, 5):
        raise ValueError(f"unknown synth version {version}")
    rng = np.random.default_rng(int(seed))
    force = None
    if regime is not None:
        from .synth_v4 import REGIMES, regime_version

        if regime not in REGIMES or version < regime_version(regime):
            raise ValueError(f"unknown regime {regime!r} for synth version {version}")
        force = REGIMES[regime]
        kind = force["kind"]
    if kind is None:
        weights = np.array(_KIND_WEIGHTS_V4 if version >= 4 else _KIND_WEIGHTS)
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be some of {KINDS}, got {tuple(kinds)}")
        weights *= [k in kinds for k in KINDS]
        kind = str(rng.choice(KINDS, p=weights / weights.sum()))
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if version >= 4:
        from .synth_v4 import cells_v4, nuclei_v4
        image, labels = (nuclei_v4(rng, model_size, force, haze=version >= 5) if kind == "nuclei"
                         else cells_v4(rng, model_size, two_channel=kind == "cells2"))
    elif kind == "nuclei":
        image, labels = _nuclei(rng, model_size, version)
    elif kind == "cells":
        image, labels = _cells(rng, model_size, two_channel=False)
    elif kind == "cells2":
        image, labels = _cells(rng, model_size, two_channel=True)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return SynthSample(image=image, labels=labels.astype(np.int32), kind=kind, seed=int(seed))
