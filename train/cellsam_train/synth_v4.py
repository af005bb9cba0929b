"""Generator version 4 (`synth.generate(..., version=4)`): broader nuclei images for real data.

What version 4 adds to version 3's nuclei, all drawn per image from the seed:

- sizes: nuclei 6-120 px across at model scale, log-uniform, most mass at 15-60 px
  (`CORE_DIAMETER`); dense touching clusters;
- texture: chromatin granularity, bright speckles (chromocentres), nucleoli (dark holes or
  bright spots);
- shapes: mitotic figures (bright condensed rods/plates, anaphase pairs of rods) and apoptotic
  bodies (tight groups of small, very bright fragments, labelled as one object);
- optics: per-nucleus defocus, dim cells, uneven (multiplicative) illumination;
- camera: Poisson-Gaussian noise, sCMOS fixed-pattern noise (column offsets, per-pixel offset
  and gain, hot pixels), gamma and gain changes;
- contrast: some images inverted (dark nuclei on a bright field, with an optional bright
  halo as in phase contrast or brightfield).

Whole-cell images (one or two channels) keep version 3's geometry with the version 4 camera.

Version 5 (`haze=True`) adds, to 40 % of nuclei images, unlabelled cytoplasm around the nuclei:
a dim, uneven territory of irregular (often spindle-like) shape around each nucleus, as
bleed-through from a cytoplasmic stain or autofluorescence makes it in a nuclear channel. The
model learns that bright nuclei over such haze are the objects, not the haze.
"""
from __future__ import annotations

import cv2
import numpy as np

from . import synth as _s

__all__ = ["CORE_DIAMETER", "OBJECT_DIAMETER", "REGIMES", "regime_version", "nuclei_v4", "cells_v4",
           "acquire_v4"]

# Nucleus diameters (model px): 80 % of images draw their mean from the core range, the rest
# from the whole range. OBJECT_DIAMETER is the core's median (its geometric mean).
CORE_DIAMETER = (15.0, 60.0)
FULL_DIAMETER = (6.0, 120.0)
OBJECT_DIAMETER = float(np.sqrt(CORE_DIAMETER[0] * CORE_DIAMETER[1]))

# Held-out test regimes (`generate(seed, version=4, regime=NAME)`): the choices a regime forces.
# Unforced samples (regime None, what training draws) consume the same random numbers as ever.
REGIMES = {
    "small": {"kind": "nuclei", "diameter": (6.0, 15.0)},
    "large_textured": {"kind": "nuclei", "diameter": (60.0, 100.0), "textured": True},
    "dense": {"kind": "nuclei", "dense": True},
    "dim": {"kind": "nuclei", "dim": True, "defocus": True},
    "mitotic": {"kind": "nuclei", "mitotic": True, "apoptotic": True},
    "inverted": {"kind": "nuclei", "invert": True},
    "cells2": {"kind": "cells2"},
    "hazy": {"kind": "nuclei", "haze": True},  # version 5
}


def regime_version(regime: str) -> int:
    """The generator version a held-out regime is drawn from (the oldest that has it)."""
    return 5 if REGIMES[regime].get("haze") else 4


def _hit(rng: np.random.Generator, p: float, forced=None) -> bool:
    """A random decision with probability p, or the forced value (same random draw either way)."""
    hit = rng.random() < p
    return hit if forced is None else bool(forced)


def _mean_diameter(rng: np.random.Generator, forced=None) -> float:
    lo, hi = CORE_DIAMETER if rng.random() < 0.8 else FULL_DIAMETER
    d = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    if forced is not None:
        d = float(np.exp(rng.uniform(np.log(forced[0]), np.log(forced[1]))))
    return d


def _style_v4(rng: np.random.Generator, radius: float, textured=None) -> dict:
    """Per-image nuclear appearance with version 4's chromatin, speckles and nucleoli."""
    style = _s._random_style(rng, radius)
    textured = _hit(rng, 0.5, textured)
    style.update(
        chromatin=rng.uniform(0.2, 0.8) if textured else rng.uniform(0.0, 0.3),
        grain=rng.uniform(0.8, max(1.2, radius / 4)),
        speckle=rng.uniform(0.002, 0.03) if rng.random() < 0.35 else 0.0,
        nucleoli=int(rng.integers(1, 5)) if rng.random() < 0.35 else 0,
        nucleoli_sign=-1.0 if rng.random() < 0.75 else 1.0,
    )
    return style


def _insert(rng, h, w, objects, labels, gains, styles, new_objs, new_gains, new_styles,
            max_overlap=0.2):
    """Lay new objects on top (skipping those that mostly cover an old one); relabel 1..K,
    dropping old objects left with < 55 % of their pixels."""
    objects, gains, styles = list(objects), list(gains), list(styles)
    for (y0, x0, m), g, st in zip(new_objs, new_gains, new_styles):
        sl = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
        if (labels[sl][m] > 0).mean() > max_overlap:
            continue
        objects.append((y0, x0, m))
        gains.append(g)
        styles.append(st)
        labels[sl][m] = len(objects)
    out = np.zeros_like(labels)
    ko, kg, ks = [], [], []
    for i, (y0, x0, m) in enumerate(objects):
        sl = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
        vis = (labels[sl] == i + 1) & m
        if vis.sum() >= 0.55 * m.sum() and vis.sum() >= 4:
            ko.append((y0, x0, m))
            kg.append(gains[i])
            ks.append(styles[i])
            out[sl][vis] = len(ko)
    return ko, out, kg, ks


def _mitotic(rng, h, w, placed, mean_d, scale_px, style):
    """Condensed chromosomes: rods/plates (metaphase) and parallel rod pairs (anaphase)."""
    k = int(rng.integers(1, 4) + rng.uniform(0, 0.06) * len(placed))
    objs, gains, styles = [], [], []
    mstyle = {**style, "chromatin": rng.uniform(0.3, 0.9), "grain": rng.uniform(0.7, 1.5),
              "dome": rng.uniform(-0.1, 0.3), "rim": 0.0, "speckle": 0.0, "nucleoli": 0}
    centres = _s._place_centres(rng, h, w, 0.5 * mean_d * rng.uniform(0.5, 0.9, k), min_sep=1.0,
                                clustered=False, existing=placed)
    for x, y, r in centres:
        length = r * rng.uniform(0.8, 1.3)
        elong = rng.uniform(3.0, 8.0)
        poly = _s.blob_polygon(rng, length / np.sqrt(elong), elong, rng.uniform(0.1, 0.4))
        gain = float(rng.uniform(1.8, 4.5))
        if rng.random() < 0.35:  # anaphase: two parallel rods, two labels
            # the polygon's long axis direction: the vertex farthest from the centre
            far = poly[np.argmax(np.hypot(poly[:, 0], poly[:, 1]))]
            nx, ny = -far[1], far[0]
            nrm = np.hypot(nx, ny) + 1e-6
            gap = length * rng.uniform(0.5, 1.2) / nrm
            parts = [(x + nx * gap, y + ny * gap), (x - nx * gap, y - ny * gap)]
        else:
            parts = [(x, y)]
        for px, py in parts:
            ras = _s._raster(poly, px, py, h, w)
            if ras is not None and ras[2].sum() >= 6:
                objs.append(ras)
                gains.append(gain)
                styles.append(mstyle)
    return objs, gains, styles


def _apoptotic(rng, h, w, placed, mean_d, scale_px, style):
    """Apoptotic bodies: a tight group of small very bright round fragments, one label."""
    k = int(rng.integers(1, 4))
    objs, gains, styles = [], [], []
    astyle = {**style, "chromatin": 0.05, "dome": rng.uniform(0.2, 0.8), "rim": 0.0,
              "speckle": 0.0, "nucleoli": 0, "p_spots": 0.0}
    centres = _s._place_centres(rng, h, w, 0.25 * mean_d * np.ones(k), min_sep=1.2,
                                clustered=False, existing=placed)
    for x, y, r in centres:
        n = int(rng.integers(2, 7))
        parts = []
        for _ in range(n):
            fr = max(1.5 * scale_px, r * rng.uniform(0.25, 0.55))
            fx, fy = x + rng.normal(0, 0.6 * r), y + rng.normal(0, 0.6 * r)
            ras = _s._raster(_s.blob_polygon(rng, fr, rng.uniform(1.0, 1.4), 0.1), fx, fy, h, w)
            if ras is not None:
                parts.append(ras)
        if not parts:
            continue
        y0 = min(p[0] for p in parts)
        x0 = min(p[1] for p in parts)
        y1 = max(p[0] + p[2].shape[0] for p in parts)
        x1 = max(p[1] + p[2].shape[1] for p in parts)
        m = np.zeros((y1 - y0, x1 - x0), bool)
        for py, px, pm in parts:
            m[py - y0:py - y0 + pm.shape[0], px - x0:px - x0 + pm.shape[1]] |= pm
        if m.sum() >= 6:
            objs.append((y0, x0, m))
            gains.append(float(rng.uniform(2.0, 5.0)))
            styles.append(astyle)
    return objs, gains, styles


def _texture_extras(rng: np.random.Generator, sig: np.ndarray, labels: np.ndarray,
                    style: dict, scale_px: float) -> np.ndarray:
    """Bright speckles inside nuclei (one image-wide pass, cheap)."""
    if style.get("speckle", 0.0) <= 0:
        return sig
    h, w = sig.shape
    inside = labels > 0
    pts = (rng.random((h, w)) < style["speckle"] / max(scale_px, 0.5) ** 2) & inside
    spots = pts.astype(np.float32) * rng.uniform(2.0, 8.0)
    spots = cv2.GaussianBlur(spots, (0, 0), rng.uniform(0.6, 1.4) * scale_px)
    level = float(np.percentile(sig[inside], 50)) if inside.any() else 1.0
    return sig + spots * level * (labels > 0)


def _fluorescence_v4(rng, h, w, objects, labels, styles, edge_sigma, gains, spread):
    """Signal image with per-object styles and nucleoli (dark or bright interior spots)."""
    img = np.zeros((h, w), np.float32)
    per_object = np.ndim(edge_sigma) > 0
    for k, (y0, x0, m) in enumerate(objects):
        st = styles[k]
        t = _s._object_texture(rng, m, st)
        nn = st.get("nucleoli", 0)
        if nn:
            dist = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
            ys, xs = np.nonzero(dist > 0.45 * dist.max())
            if len(ys):
                yy, xx = np.ogrid[:m.shape[0], :m.shape[1]]
                for _ in range(nn):
                    i = rng.integers(len(ys))
                    rad = max(0.8, dist.max() * rng.uniform(0.12, 0.28))
                    spot = np.exp(-((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * rad ** 2))
                    amp = rng.uniform(0.3, 0.75) if st["nucleoli_sign"] < 0 else rng.uniform(0.3, 1.0)
                    t = t * (1.0 + st["nucleoli_sign"] * amp * spot)
        t = np.clip(t, 0.05, None) * np.float32(gains[k])
        sigma = float(edge_sigma[k]) if per_object else float(edge_sigma)
        _s.add_object(img, y0, x0, m, t, sigma, (float(np.exp(rng.normal(0, spread))),))
    return img


def acquire_v4(rng: np.random.Generator, signal: np.ndarray, scale_px: float, dtype,
               labels: np.ndarray | None = None, allow_invert: bool = True,
               invert=None) -> np.ndarray:
    """Optics and camera of version 4 (see the module docstring)."""
    h, w = signal.shape
    psf = rng.uniform(0.0, 1.5) * scale_px
    if rng.random() < 0.35:
        psf = rng.uniform(1.0, 2.5) * scale_px
    img = cv2.GaussianBlur(signal, (0, 0), psf) if psf > 0.3 else signal.copy()
    if rng.random() < 0.5:  # uneven illumination (multiplicative): vignetting or a smooth field
        if rng.random() < 0.5:
            yy, xx = np.mgrid[:h, :w].astype(np.float32)
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            rr = ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.5 * (h * h + w * w))
            illum = 1.0 - rng.uniform(0.2, 0.7) * np.clip(rr, 0, 1)
        else:
            illum = 1.0 + rng.uniform(0.15, 0.5) * _s._smooth_noise(rng, h, w, rng.uniform(80, 400))
        img = img * np.clip(illum, 0.15, None).astype(np.float32)
    level = rng.uniform(0.0, 0.15) if rng.random() < 0.6 else rng.uniform(0.15, 0.6)
    bg = level * (1 + rng.uniform(0, 0.6) * _s._smooth_noise(rng, h, w, rng.uniform(50, 300)))
    img = img + np.clip(bg, 0, None).astype(np.float32)
    invert = allow_invert and _hit(rng, 0.12, invert)
    if invert:
        # Transmitted-light-like: dark nuclei on a bright field, optionally a bright halo.
        top = float(np.percentile(img, 99.5)) + 1e-3
        inv = 1.0 - rng.uniform(0.3, 0.8) * img / top
        if labels is not None and rng.random() < 0.6:
            edge = cv2.morphologyEx((labels > 0).astype(np.uint8), cv2.MORPH_GRADIENT,
                                    np.ones((3, 3), np.uint8)).astype(np.float32)
            halo = cv2.GaussianBlur(edge, (0, 0), max(1.0, rng.uniform(1.0, 3.0) * scale_px))
            halo *= (labels == 0)
            inv = inv + rng.uniform(0.5, 2.5) * halo / (halo.max() + 1e-6) * 0.3
        img = np.clip(inv, 0.01, None).astype(np.float32)
    photons = float(np.exp(rng.uniform(np.log(10), np.log(3000))))
    img = rng.poisson(np.clip(img, 0, None) * photons).astype(np.float32) / photons
    read = rng.uniform(0.0, 0.04)
    img += rng.normal(0, read, img.shape).astype(np.float32)
    if rng.random() < 0.3:  # sCMOS fixed pattern: column offsets, pixel offset/gain, hot pixels
        img += rng.normal(0, rng.uniform(0.002, 0.02), (1, w)).astype(np.float32)
        img *= (1 + rng.normal(0, rng.uniform(0.005, 0.03), (h, w))).astype(np.float32)
        img += rng.normal(0, rng.uniform(0.0, 0.01), (h, w)).astype(np.float32)
        hot = rng.random((h, w)) < rng.uniform(0, 3e-4)
        img[hot] += rng.uniform(0.5, 3.0)
    img = np.clip(img, 0, None)
    if rng.random() < 0.3:  # gamma (display-stretched or non-linear exports)
        top = float(np.percentile(img, 99.9)) + 1e-6
        img = top * (img / top) ** rng.uniform(0.6, 1.6)
    top_val = 255 if dtype == np.uint8 else int(rng.choice([4095, 16383, 65535]))
    gain = top_val * rng.uniform(0.1, 0.95) / max(float(np.percentile(img, 99.9)), 1e-3)
    offset = rng.uniform(0, 0.08) * top_val if rng.random() < 0.4 else 0.0
    return np.clip(np.round(img * gain + offset), 0, top_val).astype(dtype)


def _haze(rng: np.random.Generator, labels: np.ndarray, mean_d: float, scale_px: float,
          level: float) -> np.ndarray:
    """Unlabelled cytoplasm around the nuclei, relative to nuclear intensity 1: the pixels within
    a noisy reach of a nucleus, the reach longer along one random axis (spindle-like cells),
    at `level`, uneven and fading outwards."""
    h, w = labels.shape
    outside = (labels == 0).astype(np.uint8)
    dist = cv2.distanceTransform(outside, cv2.DIST_L2, 5)
    reach = 0.5 * mean_d * rng.uniform(1.0, 3.5)
    stretch = rng.uniform(0.0, 4.0)
    angle = rng.uniform(0, np.pi)
    # Distances across the axis count more than along it: the direction from the nucleus is
    # the distance field's gradient.
    dx = cv2.Sobel(dist, cv2.CV_32F, 1, 0, ksize=3)
    dy = cv2.Sobel(dist, cv2.CV_32F, 0, 1, ksize=3)
    across = np.abs(-np.sin(angle) * dx + np.cos(angle) * dy) / (np.sqrt(dx * dx + dy * dy) + 1e-6)
    eff = dist * (1.0 + stretch * across)
    limit = reach * (1.0 + 0.35 * _s._smooth_noise(rng, h, w, max(2.0, 0.6 * mean_d)))
    fade = np.exp(-eff / max(reach * rng.uniform(1.0, 4.0), 1.0))
    tex = np.clip(1.0 + rng.uniform(0.2, 0.6) * _s._smooth_noise(rng, h, w, max(1.5, 0.1 * mean_d)),
                  0.2, None)
    out = np.where((eff < limit) & (outside > 0), level * fade * tex, 0.0).astype(np.float32)
    out = cv2.GaussianBlur(out, (0, 0), max(0.6, rng.uniform(0.3, 1.2) * scale_px))
    out[labels > 0] += level * rng.uniform(0.0, 0.5)  # cytoplasm above and below the nucleus
    return out


def nuclei_v4(rng: np.random.Generator, model_size: int, force: dict | None = None,
              haze: bool = False):
    """One-channel nuclei image and labels (version 4; `haze`: version 5); `force` holds a
    regime's choices."""
    f = force or {}
    h, w, scale_px = _s._canvas(rng, model_size)
    mean_d = _mean_diameter(rng, f.get("diameter")) * scale_px
    dense = _hit(rng, 0.3, f.get("dense"))
    frac = rng.uniform(0.35, 0.75) if dense else rng.uniform(0.03, 0.5)
    n_target = int(np.clip(frac * h * w / (np.pi * mean_d ** 2 / 4), 1, 500))
    radii = 0.5 * mean_d * np.exp(rng.normal(0, rng.uniform(0.08, 0.3), n_target))
    min_sep = rng.uniform(0.55, 0.8) if dense else rng.uniform(0.7, 1.1)
    placed = _s._place_centres(rng, h, w, radii, min_sep=min_sep,
                               clustered=dense or rng.random() < 0.35)
    objects, labels = _s._draw_objects(rng, h, w, placed, scale_px, (1.0, rng.uniform(1.05, 2.2)),
                                       wobble=rng.uniform(0.0, 0.5))
    style = _style_v4(rng, 0.5 * mean_d, f.get("textured"))
    if _hit(rng, 0.4, False if f.get("textured") else None):  # smooth, evenly stained nuclei
        style.update(chromatin=rng.uniform(0.0, 0.1), p_spots=0.0, rim=0.0, speckle=0.0,
                     nucleoli=0, dome=rng.uniform(0.2, 0.9))
    gains = [1.0] * len(objects)
    styles = [style] * len(objects)
    if _hit(rng, 0.4, f.get("mitotic")):
        new = _mitotic(rng, h, w, placed, mean_d, scale_px, style)
        objects, labels, gains, styles = _insert(rng, h, w, objects, labels, gains, styles, *new)
    if _hit(rng, 0.25, f.get("apoptotic")):
        new = _apoptotic(rng, h, w, placed, mean_d, scale_px, style)
        objects, labels, gains, styles = _insert(rng, h, w, objects, labels, gains, styles, *new)
    spread = rng.uniform(0.1, 0.7)
    edge_sigma = rng.uniform(0.0, 1.2) * scale_px
    if rng.random() < 0.4:
        edge_sigma = rng.uniform(0.5, 2.0) * scale_px
    if _hit(rng, 0.4, f.get("dim")):  # dim subpopulation
        dim = rng.random(len(gains)) < rng.uniform(0.1, 0.4)
        gains = [g * (rng.uniform(0.3, 0.65) if d else 1.0) for g, d in zip(gains, dim)]
    if _hit(rng, 0.4, f.get("defocus")):  # nuclei at different depths, some far out of focus
        edge_sigma = edge_sigma + rng.uniform(0.0, 1.0, len(objects)) ** 2 * rng.uniform(1.5, 4.0) * scale_px
    signal = _fluorescence_v4(rng, h, w, objects, labels, styles, edge_sigma, gains, spread)
    signal = _texture_extras(rng, signal, labels, style, scale_px)
    _s._debris(rng, signal, scale_px, 1.0)
    if haze and _hit(rng, 0.4, f.get("haze")):
        top = float(np.percentile(signal[labels > 0], 50)) if (labels > 0).any() else 1.0
        signal = signal + top * _haze(rng, labels, mean_d, scale_px, rng.uniform(0.05, 0.35))
    dtype = np.uint8 if rng.random() < 0.4 else np.uint16
    return acquire_v4(rng, signal, scale_px, dtype, labels, invert=f.get("invert")), labels


def cells_v4(rng: np.random.Generator, model_size: int, two_channel: bool):
    """Whole cells (version 3 geometry and stains) through the version 4 camera."""
    return _s._cells(rng, model_size, two_channel, acquire=lambda r, sig, sc, dt:
                     acquire_v4(r, sig, sc, dt, None, allow_invert=False))
