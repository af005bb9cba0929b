"""Train the small default model on synthetic images, then save its checkpoint and model directory.

    python -m cellsam_train --out DIR [--steps N] [--seed S] [--device cpu|cuda]

Every image goes through the runtime's own preprocessing (`cellsam_rt.stages.preprocess`), so training
and inference see identical inputs. One step trains all three blocks:

- detector (PointDetector): sigmoid focal loss on every (anchor, class) pair with each cell
  assigned to the one anchor whose grid cell holds its box centre (class 1 is always a
  negative), L1 + GIoU on the assigned anchors' boxes;
- SAM decoder, prompted with jittered ground-truth boxes through the exported decoder's own
  arithmetic (`DecoderGraph`): BCE + Dice on the low-res masks against area-downsampled truth;
- SAM IoU head: MSE against the actual IoU of its thresholded mask.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from cellsam_rt.stages.preprocess import preprocess

from cellsam_export.build import CellSAMConfig, build_cellsam, count_parameters
from cellsam_export.checkpoint import save_checkpoint
from cellsam_export.onnx_export import DecoderGraph
from .config import MODEL_NAME, SMALL_CONFIG, SMALL_CONFIG_V1, TrainSettings
from .synth import KINDS, SYNTH_VERSION, generate

__all__ = ["make_example", "Batch", "collate", "mask_losses", "training_losses", "warm_start", "train", "file_logger", "main",
           "DESCRIPTION"]

CONFIGS = {"small": SMALL_CONFIG, "small-v1": SMALL_CONFIG_V1}

DESCRIPTION = (
    "cellsam-rt-small: a small CellSAM-family model (SAM ViT, 128 wide, 4 windowed blocks, patch 8, "
    "with neck; 128-wide SAM prompt encoder and mask decoder; a one-to-one anchor-point detector "
    "at stride 8) trained by cellsam-rt on synthetic (procedurally generated) fluorescence images "
    "only, on a CPU "
    "(python -m cellsam_train). It lets `cellsam-rt run` work out of the box; for the "
    "accuracy of the published model, export the real CellSAM weights: `cellsam-rt export "
    "--checkpoint cellsam_general.pt --out MODEL_DIR` and pass `--model MODEL_DIR`."
)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a label image to size x size with pixel-centre alignment."""
    h, w = labels.shape
    ys = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return labels[ys[:, None], xs[None, :]]


def make_example(image: np.ndarray, labels: np.ndarray, image_size: int, mask_block: int = 4) -> dict:
    """Preprocessed inputs and S-space targets (boxes xyxy, instance masks at S/mask_block).

    mask_block is S / (the decoder's low-res mask side) = patch_size / 4. Negative labels mark
    objects that are neither cells nor background (`real_data.UNLABELLED`): their boxes come
    back as "ignore_boxes", and their pixels count as background in the masks.
    """
    enc, cf, _ = preprocess(image, image_size, False)
    lab = resize_labels(labels, image_size)
    other, _ = ndimage.label(lab < 0)
    ignore = [[xs.start, ys.start, xs.stop, ys.stop] for ys, xs in ndimage.find_objects(other)]
    lab = np.maximum(lab, 0)
    boxes, masks = [], []
    b = int(mask_block)
    low = image_size // b
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        m = lab == k
        if m.sum() < 4:
            continue
        ys, xs = sl
        # Boxes span the pixels' full extent; the runtime's boxes are read the same way.
        boxes.append([xs.start, ys.start, xs.stop, ys.stop])
        # b x b block means = the low-res pixel's coverage (pixel centres line up with the
        # align_corners=False upsampling the runtime applies to the logits).
        masks.append(m.reshape(low, b, low, b).mean(axis=(1, 3)).astype(np.float32))
    return {
        "encoder_in": enc,
        "cellfinder_in": cf,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "masks": np.stack(masks) if masks else np.zeros((0, low, low), np.float32),
        "ignore_boxes": np.asarray(ignore, np.float32).reshape(-1, 4),
    }


def extra_noise(image: np.ndarray, rng: np.random.Generator, low: float = 4.0,
                high: float = 25.0) -> np.ndarray:
    """`image` under extra white camera noise, in its dtype: its 1-99 % intensity span comes to
    `low`..`high` (log-uniform) noise standard deviations, as in very short or dim exposures."""
    x = image.astype(np.float64)
    lo, hi = np.percentile(x, [1, 99])
    if hi <= lo:
        return image
    ratio = math.exp(rng.uniform(math.log(low), math.log(high)))
    x += rng.normal(0.0, (hi - lo) / ratio, x.shape)
    if image.dtype.kind in "ui":
        info = np.iinfo(image.dtype)
        x = np.clip(np.rint(x), info.min, info.max)
    return x.astype(image.dtype)


class SynthStream(torch.utils.data.IterableDataset):
    """Endless stream of preprocessed synthetic examples; sample i is generated from seed base+i.

    `image_size` is the side of the model-space image made per sample (a crop of the model's
    frame when smaller than the model's input size). With `real` (a `real_data.RealImages`),
    a `real_fraction` share of the samples (drawn per index from the seed) are augmented crops
    of real labelled images instead.
    """

    def __init__(self, base_seed: int, image_size: int, start: int = 0, version: int = SYNTH_VERSION,
                 mask_block: int = 4, real=None, real_fraction: float = 0.0,
                 replay_version: int = 0, replay_fraction: float = 0.0,
                 focus_regime: str = "", focus_fraction: float = 0.0,
                 kinds: tuple = KINDS, noise_fraction: float = 0.0) -> None:
        super().__init__()
        self.kinds = tuple(kinds)
        self.noise_fraction = noise_fraction
        self.focus_regime = focus_regime
        self.focus_fraction = focus_fraction if focus_regime else 0.0
        self.replay_version = replay_version
        self.replay_fraction = replay_fraction if replay_version else 0.0
        self.real = real
        self.real_fraction = real_fraction if real is not None else 0.0
        self.mask_block = mask_block
        self.base_seed = base_seed
        self.image_size = image_size
        self.start = start
        self.version = version

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start + wid
        while True:
            source = self.source(i)
            example = make_example(*self._draw(i, source), self.image_size, self.mask_block)
            example["replay"] = source == "replay"
            example["real"] = source == "real"
            yield example
            i += nw

    def source(self, i: int) -> str:
        """Where sample i comes from: "real" (a real_fraction share), "replay" (a
        replay_fraction share of the rest), "focus" (a focus_fraction share of what is left:
        generator `version` with `focus_regime` forced) or "synthetic"; drawn from the seed."""
        if self.real_fraction > 0 and self._real_rng(i).random() < self.real_fraction:
            return "real"
        if self.replay_fraction > 0 and np.random.default_rng(
                [self.base_seed, i, 11]).random() < self.replay_fraction:
            return "replay"
        if self.focus_fraction > 0 and np.random.default_rng(
                [self.base_seed, i, 13]).random() < self.focus_fraction:
            return "focus"
        return "synthetic"

    def is_real(self, i: int) -> bool:
        """Whether sample i is a crop of a real image."""
        return self.source(i) == "real"

    def is_replay(self, i: int) -> bool:
        """Whether sample i comes from generator replay_version."""
        return self.source(i) == "replay"

    def _real_rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.base_seed, i, 7])

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, labels) of sample i (synthetic, or a real crop for a real_fraction share; a
        replay_fraction share of the synthetic ones from generator replay_version)."""
        return self._draw(i, self.source(i))

    def _draw(self, i: int, source: str) -> tuple[np.ndarray, np.ndarray]:
        if source == "real":
            rng = self._real_rng(i)
            rng.random()  # the draw that chose a real image; the crop follows it
            return self.real.sample(rng, self.image_size)
        version = self.replay_version if source == "replay" else self.version
        regime = self.focus_regime if source == "focus" else None
        s = generate(self.base_seed + i, model_size=self.image_size, version=version, regime=regime,
                     kinds=self.kinds)
        rng = np.random.default_rng([self.base_seed, i, 17])
        if self.noise_fraction > 0 and rng.random() < self.noise_fraction:
            return extra_noise(s.image, rng), s.labels
        return s.image, s.labels


class Batch:
    """A training batch: stacked inputs and per-image target lists (torch tensors).

    All crops of a batch sit at the same `origin` (y, x) of the model's frame (set per step).
    """

    def __init__(self, examples: list[dict]) -> None:
        self.origin = (0, 0)
        self.encoder_in = torch.from_numpy(np.stack([e["encoder_in"] for e in examples]))
        self.cellfinder_in = torch.from_numpy(np.stack([e["cellfinder_in"] for e in examples]))
        self.boxes = [torch.from_numpy(e["boxes"]) for e in examples]
        self.masks = [torch.from_numpy(e["masks"]) for e in examples]
        self.ignore_boxes = [torch.from_numpy(e.get("ignore_boxes", np.zeros((0, 4), np.float32)))
                             for e in examples]
        self.replay = torch.tensor([bool(e.get("replay", False)) for e in examples])
        self.real = torch.tensor([bool(e.get("real", False)) for e in examples])

    def to(self, device: torch.device) -> "Batch":
        """Move every tensor to `device`."""
        self.encoder_in = self.encoder_in.to(device)
        self.cellfinder_in = self.cellfinder_in.to(device)
        self.boxes = [b.to(device) for b in self.boxes]
        self.masks = [m.to(device) for m in self.masks]
        self.ignore_boxes = [b.to(device) for b in self.ignore_boxes]
        self.replay = self.replay.to(device)
        self.real = self.real.to(device)
        return self


def collate(examples: list[dict]) -> Batch:
    """DataLoader collate function."""
    return Batch(examples)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _xyxy(cxcywh: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = cxcywh.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of two [N,4] xyxy box sets."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-9)
    lt_c = torch.minimum(a[:, :2], b[:, :2])
    rb_c = torch.maximum(a[:, 2:], b[:, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def centre_cells(boxes: torch.Tensor, g: int, stride: int):
    """(cx, cy, gx, gy): the xyxy boxes' centres and the cells of a g x g anchor grid holding them."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return cx, cy, (cx / stride).long().clamp(0, g - 1), (cy / stride).long().clamp(0, g - 1)


def assign_anchors(boxes: torch.Tensor, image_size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor index, box index) of the one-to-one assignment: the anchor holding each box centre.

    Two centres in one grid cell: the larger box keeps the anchor (the smaller is left
    undetected rather than given a box it cannot have).
    """
    if boxes.numel() == 0:
        e = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return e, e
    g = image_size // stride
    _, _, gx, gy = centre_cells(boxes, g, stride)
    anchor = gy * g + gx
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = torch.argsort(area)  # ascending: later (larger) boxes overwrite
    owner = torch.full((g * g,), -1, dtype=torch.long, device=boxes.device)
    owner[anchor[order]] = order
    keep = owner[anchor] == torch.arange(len(boxes), device=boxes.device)
    return anchor[keep], torch.nonzero(keep).squeeze(1)


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of two equally shaped [...,4] xyxy box tensors."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1) + (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1) - inter
    return inter / union.clamp(min=1e-9)


def match_anchors(boxes: torch.Tensor, crop: int, stride: int, probs: torch.Tensor,
                  pred_xyxy: torch.Tensor, frame_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor index, box index) of a one-to-one matching that follows the detector's own choice.

    Candidates for a cell are the 3x3 anchors around the one holding its centre; each scores
    sqrt(p) * IoU^2 of its prediction, times a Gaussian centre prior (sigma one stride) so the
    centre anchor wins while predictions are still random. Pairs are taken greedily, best first,
    one anchor per cell and one cell per anchor. Following the detector's preference (as
    DETR-style set training does) instead of a fixed rule keeps the targets of neighbouring
    anchors consistent, which a detector decoded without NMS needs to become confident.
    """
    n = len(boxes)
    if n == 0:
        e = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return e, e
    g = crop // stride
    cx, cy, gx, gy = centre_cells(boxes, g, stride)
    off = torch.tensor([-1, 0, 1], device=boxes.device)
    ax = (gx[:, None, None] + off[None, None, :]).expand(n, 3, 3).reshape(n, 9)
    ay = (gy[:, None, None] + off[None, :, None]).expand(n, 3, 3).reshape(n, 9)
    valid = (ax >= 0) & (ax < g) & (ay >= 0) & (ay < g)
    idx = (ay.clamp(0, g - 1) * g + ax.clamp(0, g - 1))
    with torch.no_grad():
        d2 = (((ax.float() + 0.5) * stride - cx[:, None]) ** 2 + ((ay.float() + 0.5) * stride - cy[:, None]) ** 2)
        prior = torch.exp(-d2 / (2.0 * stride ** 2))
        iou = box_iou_pairs(pred_xyxy[idx], frame_boxes[:, None, :].expand(n, 9, 4))
        quality = probs[idx].clamp(min=1e-6).sqrt() * iou.pow(2) * prior + 1e-9 * prior
        quality = torch.where(valid, quality, torch.full_like(quality, -1.0))
    order = torch.argsort(quality.reshape(-1), descending=True).tolist()
    flat_idx = idx.reshape(-1).tolist()
    flat_q = quality.reshape(-1).tolist()
    box_taken, anchor_taken = set(), set()
    anchors_out, boxes_out = [], []
    for k in order:
        if flat_q[k] < 0:
            break
        b, a = k // 9, flat_idx[k]
        if b in box_taken or a in anchor_taken:
            continue
        box_taken.add(b)
        anchor_taken.add(a)
        anchors_out.append(a)
        boxes_out.append(b)
    dev = boxes.device
    return torch.tensor(anchors_out, dtype=torch.long, device=dev), torch.tensor(boxes_out, dtype=torch.long, device=dev)


def ignored_anchors(ignore: torch.Tensor, crop: int, stride: int, pred_xyxy: torch.Tensor,
                    frame_ignore: torch.Tensor, min_iou: float = 0.3) -> torch.Tensor:
    """[A] bool: anchors left out of the classification loss because an unlabelled object is
    theirs to find: the anchor holding its centre, and any anchor whose predicted box overlaps
    it by `min_iou` (boxes: `ignore` in crop px, `frame_ignore` and `pred_xyxy` in frame units).

    Counting such objects as background would teach the detector that what looks like them (small
    bright blobs, for micronuclei) is never a cell."""
    out = torch.zeros(len(pred_xyxy), dtype=torch.bool, device=pred_xyxy.device)
    if ignore.numel() == 0:
        return out
    g = crop // stride
    _, _, gx, gy = centre_cells(ignore, g, stride)
    out[gy * g + gx] = True
    iou = box_iou_pairs(pred_xyxy[:, None, :], frame_ignore[None, :, :])
    return out | (iou >= min_iou).any(1)


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise sigmoid focal loss (RetinaNet)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * target + (1 - alpha) * (1 - target)) * loss


def jitter_boxes(boxes: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Boxes with Gaussian corner noise proportional to their side (mimics detector error)."""
    if scale <= 0 or boxes.numel() == 0:
        return boxes
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = torch.randn(boxes.shape, generator=gen).to(boxes.device) * scale * wh
    out = boxes + noise
    lo = torch.minimum(out[:, :2], out[:, 2:] - 1)
    return torch.cat([lo, torch.maximum(out[:, 2:], lo + 1)], dim=1)


def encode_crop(encoder, image: torch.Tensor, origin: tuple[int, int]) -> torch.Tensor:
    """ImageEncoderViT on a crop at `origin` of the frame: the frame's positional embedding slice.

    Exact for window-aligned origins when no block uses global attention (every op is local).
    """
    p = encoder.patch_embed.proj.kernel_size[0]
    x = encoder.patch_embed(image)
    if encoder.pos_embed is not None:
        ty, tx = origin[0] // p, origin[1] // p
        x = x + encoder.pos_embed[:, ty:ty + x.shape[1], tx:tx + x.shape[2], :]
    for blk in encoder.blocks:
        x = blk(x)
    return encoder.neck(x.permute(0, 3, 1, 2))


def random_origin(frame: int, crop: int, align: int, gen: torch.Generator) -> tuple[int, int]:
    """A random (y, x) crop origin inside the frame, on multiples of `align`."""
    n = (frame - crop) // align + 1
    oy, ox = torch.randint(0, n, (2,), generator=gen).tolist()
    return oy * align, ox * align


def mask_losses(mask_logits: torch.Tensor, iou_pred: torch.Tensor, truth: torch.Tensor,
                weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(BCE, Dice, IoU-head MSE) of mask logits [N,1,h,w] against soft truth masks [N,h,w], each
    a mean over the N masks (weighted by `weights` [N] if given).

    The IoU head's target is the actual IoU of the thresholded mask with the truth."""
    w = torch.ones(len(truth), device=truth.device) if weights is None else weights
    w = w / w.sum().clamp(min=1e-12)
    mt = truth.unsqueeze(1)
    l_bce = (F.binary_cross_entropy_with_logits(mask_logits, mt, reduction="none").flatten(1).mean(1)
             * w).sum()
    prob = torch.sigmoid(mask_logits).flatten(1)
    tf = mt.flatten(1)
    l_dice = ((1 - (2 * (prob * tf).sum(1) + 1) / (prob.sum(1) + tf.sum(1) + 1)) * w).sum()
    with torch.no_grad():
        hard = (mask_logits > 0).flatten(1).float()
        tgt = (tf >= 0.5).float()
        inter = (hard * tgt).sum(1)
        actual = inter / ((hard + tgt).clamp(max=1).sum(1)).clamp(min=1)
    return l_bce, l_dice, ((iou_pred[:, 0] - actual) ** 2 * w).sum()


def distill_losses(logits: torch.Tensor, boxes: torch.Tensor, t_logits: torch.Tensor,
                   t_boxes: torch.Tensor, threshold: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, box) losses of a detector's outputs against a teacher's on the same anchors.

    Score: BCE of the cell logits against the teacher's probabilities, summed and divided by the
    teacher's expected number of cells (the focal loss's normalisation). Box: L1 on the anchors
    the teacher would report (probability >= threshold)."""
    p_t = torch.sigmoid(t_logits[..., 0])
    n = p_t.sum().clamp(min=1.0)
    l_score = F.binary_cross_entropy_with_logits(logits[..., 0], p_t, reduction="sum") / n
    keep = p_t >= threshold
    l_box = (F.l1_loss(boxes[keep], t_boxes[keep], reduction="sum") / n if keep.any()
             else logits.sum() * 0)
    return l_score, l_box


def training_losses(model, decoder: DecoderGraph, batch: Batch, ts: TrainSettings,
                    gen: torch.Generator, boxes_per_image: Optional[int] = None,
                    teacher=None) -> dict[str, torch.Tensor]:
    """All losses of one batch (weighted terms and their total under "loss").

    `teacher` (a frozen copy of the init model's detector) adds the `replay_distill` terms on the
    batch's replay examples: the detector keeps its scores and boxes on the data it learned from,
    which rehearsal on that data's labels alone did not keep."""
    boxes_per_image = ts.boxes_per_image if boxes_per_image is None else boxes_per_image
    cfg = model.config
    s = cfg.image_size
    det = model.cellfinder
    crop = batch.cellfinder_in.shape[-1]
    oy, ox = batch.origin
    shift = torch.tensor([ox, oy, ox, oy], dtype=torch.float32, device=batch.cellfinder_in.device)
    g = crop // det.stride
    anchors = det.anchor_logits_at((oy, ox), (g, g))
    logits, pred_boxes = det.predict(batch.cellfinder_in, anchors)
    target = torch.zeros_like(logits)
    counted = torch.ones_like(logits)  # 0: an anchor left out of the classification loss
    pos_pred, pos_true = [], []
    for i, boxes in enumerate(batch.boxes):
        if ts.assign == "quality":
            anchor, idx = match_anchors(boxes, crop, det.stride, torch.sigmoid(logits[i, :, 0].detach()),
                                        _xyxy(pred_boxes[i].detach()), (boxes + shift) / s)
        else:
            anchor, idx = assign_anchors(boxes, crop, det.stride)
        if ts.unlabelled == "ignore":
            ign = batch.ignore_boxes[i]
            counted[i, ignored_anchors(ign, crop, det.stride, _xyxy(pred_boxes[i].detach()),
                                       (ign + shift) / s)] = 0.0
        counted[i, anchor] = 1.0
        target[i, anchor, 0] = 1.0
        pos_pred.append(pred_boxes[i, anchor])
        pos_true.append((boxes[idx] + shift) / s)
    num_pos = max(float(target.sum()), 1.0)
    l_cls = (sigmoid_focal(logits, target, ts.focal_alpha, ts.focal_gamma) * counted).sum() / num_pos
    pp = torch.cat(pos_pred)
    pt = torch.cat(pos_true)
    if len(pp):
        true_cxcywh = torch.stack([(pt[:, 0] + pt[:, 2]) / 2, (pt[:, 1] + pt[:, 3]) / 2,
                                   pt[:, 2] - pt[:, 0], pt[:, 3] - pt[:, 1]], dim=1)
        l_l1 = F.l1_loss(pp, true_cxcywh, reduction="sum") / num_pos
        l_giou = (1 - generalized_iou(_xyxy(pp), pt)).sum() / num_pos
    else:
        l_l1 = l_giou = logits.sum() * 0
    l_kd = logits.sum() * 0
    if teacher is not None and ts.replay_distill > 0 and bool(batch.replay.any()):
        r = batch.replay
        with torch.no_grad():
            t_logits, t_boxes = teacher.predict(batch.cellfinder_in[r], anchors)
        l_score, l_box = distill_losses(logits[r], pred_boxes[r], t_logits, t_boxes)
        l_kd = l_score + ts.w_l1 * l_box

    terms = {"cls": ts.w_class * l_cls, "l1": ts.w_l1 * l_l1, "giou": ts.w_giou * l_giou}
    if teacher is not None:
        terms["kd"] = ts.replay_distill * l_kd
    if ts.train_parts == "detector":  # the SAM side is frozen: no mask terms to compute
        terms["loss"] = sum(terms.values())
        return terms

    # Masks: a random subset of cells per image, prompted with jittered truth boxes.
    emb = encode_crop(model.model.image_encoder, batch.encoder_in, (oy, ox))
    p = s // decoder.embedding_size[0]
    ty, tx = oy // p, ox // p
    decoder.image_pe = decoder.full_image_pe[:, :, ty:ty + emb.shape[2], tx:tx + emb.shape[3]]
    sel_boxes, sel_masks, box_image, box_weight = [], [], [], []
    for i, (boxes, masks) in enumerate(zip(batch.boxes, batch.masks)):
        n = len(boxes)
        if n == 0:
            continue
        pick = torch.randperm(n, generator=gen)[:boxes_per_image].to(boxes.device)
        sel_boxes.append(jitter_boxes(boxes[pick], ts.box_jitter, gen) + shift)
        sel_masks.append(masks[pick])
        box_image.append(torch.full((len(pick),), i, dtype=torch.long, device=boxes.device))
        # Real images' outlines follow their annotators' convention; real_mask_weight < 1 keeps
        # it from setting the masks' boundary for every dataset.
        box_weight.append(torch.full((len(pick),), ts.real_mask_weight if bool(batch.real[i]) else 1.0,
                                     device=boxes.device))
    if sel_boxes:
        mask_logits, iou_pred = decoder(emb, torch.cat(sel_boxes), torch.cat(box_image))
        l_bce, l_dice, l_iou = mask_losses(mask_logits, iou_pred, torch.cat(sel_masks),
                                           torch.cat(box_weight))
    else:
        l_bce = l_dice = l_iou = emb.sum() * 0

    terms.update(bce=ts.w_mask_bce * l_bce, dice=ts.w_mask_dice * l_dice, iou=ts.w_iou * l_iou)
    terms["loss"] = sum(terms.values())
    return terms


# --------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------


def _phase1_steps(ts: TrainSettings) -> int:
    """Steps trained on crops (the rest are whole frames)."""
    return max(ts.steps - max(ts.full_frame_steps, 0), 0)


def _lr_factor(step: int, ts: TrainSettings) -> float:
    """Crop phase: linear warm-up, cosine decay to 5 %; frame phase: its own cosine from full_frame_lr."""
    n1 = _phase1_steps(ts)
    if step >= n1:
        t = (step - n1) / max(ts.steps - n1, 1)
        return ts.full_frame_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
    if step < ts.warmup:
        return (step + 1) / ts.warmup
    t = (step - ts.warmup) / max(n1 - ts.warmup, 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _loader(stream: SynthStream, batch_size: int, workers: int) -> Iterator[Batch]:
    """Batches of a synthetic stream, generated in `workers` background processes."""
    return iter(torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate,
                                            num_workers=workers, persistent_workers=workers > 0))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warm_start(model, init: Path, log=print) -> None:
    """Copy `init`'s weights (a checkpoint with its own stored config) into `model`.

    Equal shapes are copied. A different patch size is bridged: the positional embedding is
    resized bilinearly to the new token grid and the patch kernel is area-resized (scaled so a
    flat patch gives the same response). Anything else that differs is left at its init, named.
    """
    from cellsam_export.checkpoint import load_checkpoint

    src = load_checkpoint(init)[0].state_dict()
    dst = model.state_dict()
    adapted, skipped = [], []
    with torch.no_grad():
        for k, v in dst.items():
            w = src.get(k)
            if w is None:
                skipped.append(k)
            elif w.shape == v.shape:
                v.copy_(w)
            elif k.endswith("pos_embed") and w.ndim == 4:
                v.copy_(F.interpolate(w.permute(0, 3, 1, 2), size=v.shape[1:3], mode="bilinear",
                                      align_corners=False).permute(0, 2, 3, 1))
                adapted.append(k)
            elif k.endswith("patch_embed.proj.weight") and w.shape[:2] == v.shape[:2]:
                scale = (w.shape[2] * w.shape[3]) / (v.shape[2] * v.shape[3])
                v.copy_(F.interpolate(w, size=v.shape[2:], mode="area") * scale)
                adapted.append(k)
            else:
                skipped.append(k)
    log(f"initialised from {init}" + (f"; resized {', '.join(adapted)}" if adapted else "")
        + (f"; left at init: {', '.join(skipped)}" if skipped else ""))


def train(out: Path, config: CellSAMConfig = SMALL_CONFIG, ts: Optional[TrainSettings] = None,
          seed: int = 0, device: str = "cpu", workers: int = 1, log=print,
          data: Optional[Iterator[Batch]] = None, resume: bool = True,
          save_every: int = 250, init: Optional[Path] = None, real_data: Optional[Path] = None):
    """Train from scratch or from `init`'s weights (or resume out/train_state.pt) -> (model, per-step logs)."""
    ts = ts or TrainSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    dev = torch.device(device)
    model = build_cellsam(config).to(dev).train()
    if ts.pe_scale != 1.0:
        # Higher spatial frequencies let the decoder tell neighbouring tokens apart sooner (small
        # cells are 1-2 tokens wide). The matrix is a saved buffer, so export sees the same.
        with torch.no_grad():
            model.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(ts.pe_scale)
    random_detector = copy.deepcopy(model.cellfinder.state_dict()) if ts.fresh_detector else None
    if init is not None:
        # Weights only (PE buffer included): a fresh optimiser and schedule fine-tune them.
        warm_start(model, init, log)
    teacher = None
    if ts.replay_distill > 0:
        if init is None or not ts.replay_fraction:
            raise ValueError("replay distillation needs --init and --replay-version")
        teacher = copy.deepcopy(model.cellfinder).eval().requires_grad_(False)
    if random_detector is not None:
        if init is None:
            raise ValueError("a fresh detector needs --init (for the rest of the model)")
        model.cellfinder.load_state_dict(random_detector)
        log("detector reset to its random init")
    if ts.train_parts not in ("all", "detector"):
        raise ValueError(f"train_parts must be 'all' or 'detector', not {ts.train_parts!r}")
    if ts.train_parts == "detector":
        if init is None:
            raise ValueError("training the detector alone needs --init (the SAM side it keeps)")
        model.model.requires_grad_(False)
    decoder = DecoderGraph(model.model).to(dev)
    decoder.full_image_pe = decoder.image_pe  # sliced per step to the crop's position
    if config.sam_global_attn and ts.crop != config.image_size:
        raise ValueError("crop training needs an encoder without global-attention blocks")
    align = config.sam_window * config.patch_size  # crops must line up with attention windows
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ts.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=ts.lr,
                            foreach=True)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    state_path = out / "train_state.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location=dev, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        start = int(st["step"])
        log(f"resumed from {state_path} at step {start}")
    log(f"parameters: encoder {count_parameters(model.model.image_encoder)}, "
        f"prompt+decoder {count_parameters(model.model.prompt_encoder) + count_parameters(model.model.mask_decoder)}, "
        f"detector {count_parameters(model.cellfinder)}; total {count_parameters(model)}")
    log(f"settings: {json.dumps(asdict(ts))}")
    n1 = _phase1_steps(ts)
    real = None
    if real_data is not None and ts.real_fraction > 0:
        from .real_data import RealImages

        real = RealImages(real_data)
        log(f"real images: {len(real)} under {real_data}, {ts.real_fraction:.0%} of examples")

    def stream(base_seed: int, image_size: int, first: int) -> SynthStream:
        """The run's example stream (crops or whole frames) from sample `first` on."""
        return SynthStream(base_seed=base_seed, image_size=image_size, start=first,
                           version=ts.synth_version, mask_block=config.patch_size // 4, real=real,
                           real_fraction=ts.real_fraction, replay_version=ts.replay_version,
                           replay_fraction=ts.replay_fraction, focus_regime=ts.focus_regime,
                           focus_fraction=ts.focus_fraction, kinds=ts.kinds,
                           noise_fraction=ts.noise_fraction)

    given = data
    if data is None and start < n1:
        data = _loader(stream(seed * 10_000_000, ts.crop, start * ts.batch_size),
                       ts.batch_size, workers)
    history = []
    t0 = time.time()
    last = t0
    for step in range(start, ts.steps):
        if step == max(start, n1) and given is None and step < ts.steps:
            data = None  # ends the crop stream's worker
            log(f"whole-frame phase: steps {n1 + 1}-{ts.steps}, {ts.full_frame_batch} frame(s) of "
                f"{config.image_size} px per step")
            data = _loader(stream(seed * 10_000_000 + 5_000_000, config.image_size,
                                  (step - n1) * ts.full_frame_batch),
                           ts.full_frame_batch, workers)
        batch = next(data).to(dev)
        batch.origin = random_origin(config.image_size, batch.encoder_in.shape[-1], align, gen)
        for g in opt.param_groups:
            g["lr"] = ts.lr * _lr_factor(step, ts)
        terms = training_losses(model, decoder, batch, ts, gen,
                                boxes_per_image=ts.full_frame_boxes if step >= n1 else ts.boxes_per_image,
                                teacher=teacher)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, ts.grad_clip)
        opt.step()
        rec = {k: float(v.detach()) for k, v in terms.items()}
        rec.update(step=step + 1, gnorm=float(gnorm), lr=opt.param_groups[0]["lr"])
        history.append(rec)
        if (step + 1) % 10 == 0 or step == start or step + 1 == ts.steps:
            now = time.time()
            window = history[-10:]
            avg = {k: sum(r[k] for r in window) / len(window) for k in terms}
            log(f"step {step + 1}/{ts.steps} loss {avg['loss']:.4f} "
                + " ".join(f"{k} {avg[k]:.4f}" for k in terms if k != "loss")
                + f" gnorm {rec['gnorm']:.2f} lr {rec['lr']:.2e} "
                f"{(now - last) / max(len(window), 1):.2f}s/step elapsed {now - t0:.0f}s")
            last = now
        if save_every and ((step + 1) % save_every == 0 or step + 1 == ts.steps):
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "generator": gen.get_state(), "step": step + 1}, tmp)
            os.replace(tmp, state_path)
    return model.eval(), history


def export_trained(model, out: Path, config: CellSAMConfig, log=print, fp16: bool = True) -> tuple[Path, Path]:
    """Save the checkpoint (with its config) and export the model directory (name, description,
    and the windowed mask decoder the small model ships with)."""
    ckpt = save_checkpoint(out / "model.pt", model.state_dict(), config)
    return ckpt, export_checkpoint(ckpt, out / "model", fp16=fp16, log=log)


def export_checkpoint(ckpt: Path, model_dir: Path, fp16: bool = True, log=print,
                      decoder_window: Optional[dict] = None) -> Path:
    """Export a trained checkpoint to a model directory (`--export-only` re-exports a run);
    the windowed decoder's policy is `decoder_window` (default: DEFAULT_DECODER_WINDOW)."""
    from cellsam_export.onnx_export import DEFAULT_DECODER_WINDOW, export_model_dir

    model_dir = export_model_dir(ckpt, model_dir, fp16=fp16, force=True, progress=log,
                                 name=MODEL_NAME,
                                 decoder_window=decoder_window or DEFAULT_DECODER_WINDOW)
    manifest_path = model_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["description"] = DESCRIPTION
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return model_dir


def file_logger(path: Path):
    """A log function: each message time-stamped, printed and appended to `path`."""
    log_file = open(path, "a", buffering=1)

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")

    return log


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: train, save the checkpoint, export the model directory."""
    p = argparse.ArgumentParser(prog="python -m cellsam_train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoint, model dir, log)")
    p.add_argument("--steps", type=int, default=TrainSettings.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    p.add_argument("--lr", type=float, default=TrainSettings.lr)
    p.add_argument("--crop", type=int, default=TrainSettings.crop, help="training crop side (model px)")
    p.add_argument("--full-frame-steps", type=int, default=TrainSettings.full_frame_steps,
                   help="last steps trained on whole frames (included in --steps)")
    # One thread: the data worker takes the second core, and on a shared CPU a 2-thread
    # intra-op pool spends most of its time waiting for its descheduled partner.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--workers", type=int, default=1, help="data-generation processes")
    p.add_argument("--synth-version", type=int, default=TrainSettings.synth_version,
                   help="synthetic-data generator version (1: the first stage of the shipped model)")
    p.add_argument("--replay-version", type=int, default=0, metavar="V",
                   help="draw a share of the synthetic examples from generator version V (the "
                        "data the --init checkpoint was trained on), so a fine-tune keeps it")
    p.add_argument("--replay-fraction", type=float, default=0.3,
                   help="share of synthetic examples from --replay-version (default 0.3)")
    p.add_argument("--replay-distill", type=float, default=0.0, metavar="W",
                   help="on the replay examples, also learn the --init model's detector scores "
                        "and boxes, weighted W (0: off)")
    p.add_argument("--focus-regime", default="", metavar="NAME",
                   help="draw a share of the --synth-version examples with this held-out regime "
                        "forced (cellsam_train.synth_v4.REGIMES: hazy, dim, small, ...)")
    p.add_argument("--focus-fraction", type=float, default=0.3,
                   help="share of the synthetic examples from --focus-regime (default 0.3)")
    p.add_argument("--kinds", default=",".join(KINDS), metavar="K[,K...]",
                   help="synthetic kinds to draw (nuclei, cells: whole cells in one channel, "
                        "cells2: nuclear + whole-cell channels; default all)")
    p.add_argument("--noise-fraction", type=float, default=0.0, metavar="F",
                   help="share of the synthetic examples put under extra camera noise (their "
                        "intensity span 4-25 noise deviations; default 0)")
    p.add_argument("--real-data", type=Path, default=None, metavar="DIR",
                   help="real labelled images to mix in (mnfinder layout: */images/*.tif with "
                        "*/nucleus_masks/*.png); train on a training split only")
    p.add_argument("--real-fraction", type=float, default=0.35,
                   help="share of examples drawn from --real-data (default 0.35)")
    p.add_argument("--real-mask-weight", type=float, default=1.0, metavar="W",
                   help="weight of the real images' masks in the mask losses, against 1 for "
                        "synthetic ones (default 1)")
    p.add_argument("--unlabelled", choices=["ignore", "background"], default=TrainSettings.unlabelled,
                   help="objects a real image's annotators painted in another class (mnfinder's "
                        "mn_masks/ micronuclei): background (default; negatives for the detector) "
                        "or ignore (no detector loss on the anchors that would find them)")
    p.add_argument("--train", choices=["all", "detector"], default="all", dest="train_parts",
                   help="what trains: all (default) or detector (CellFinder only; the encoder and "
                        "mask decoder keep the --init weights, so the masks stay as they were)")
    p.add_argument("--fresh-detector", action="store_true",
                   help="train the detector from its random init; the rest of the model still "
                        "starts from --init (with --replay-distill the --init detector teaches)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small",
                   help="model sizes: small (patch 8, the shipped model) or small-v1 (patch 16, "
                        "its first stage)")
    p.add_argument("--init", type=Path, default=None, metavar="CKPT",
                   help="start from this checkpoint's weights (fine-tuning stage)")
    p.add_argument("--no-resume", action="store_true", help="ignore out/train_state.pt")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export at the end")
    p.add_argument("--export-only", action="store_true",
                   help="only (re-)export OUT/model.pt to OUT/model, without training")
    args = p.parse_args(argv)
    if args.replay_distill > 0 and (args.init is None or not args.replay_version):
        p.error("--replay-distill needs --init (the teacher) and --replay-version (its data)")
    if args.train_parts == "detector" and args.init is None:
        p.error("--train detector needs --init (the encoder and mask decoder it keeps)")
    if args.fresh_detector and args.init is None:
        p.error("--fresh-detector needs --init (the rest of the model)")
    if args.focus_regime:
        from .synth_v4 import REGIMES, regime_version

        known = [r for r in REGIMES if regime_version(r) <= args.synth_version]
        if args.focus_regime not in known:
            p.error(f"--focus-regime {args.focus_regime}: not a regime of --synth-version "
                    f"{args.synth_version} ({', '.join(known) or 'none: versions 4 and 5 have them'})")
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds {args.kinds}: expected some of {', '.join(KINDS)}")
    if args.export_only:
        model_dir = export_checkpoint(args.out / "model.pt", args.out / "model")
        print(f"model directory {model_dir}")
        return 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = file_logger(args.out / "train.log")
    ts = replace(TrainSettings(), steps=args.steps, batch_size=args.batch_size, lr=args.lr, crop=args.crop,
                 full_frame_steps=min(args.full_frame_steps, args.steps), synth_version=args.synth_version,
                 real_fraction=args.real_fraction if args.real_data is not None else 0.0,
                 replay_version=args.replay_version,
                 replay_fraction=args.replay_fraction if args.replay_version else 0.0,
                 replay_distill=args.replay_distill, real_mask_weight=args.real_mask_weight,
                 unlabelled=args.unlabelled, focus_regime=args.focus_regime,
                 focus_fraction=args.focus_fraction if args.focus_regime else 0.0,
                 train_parts=args.train_parts, fresh_detector=args.fresh_detector, kinds=kinds,
                 noise_fraction=args.noise_fraction)
    log(f"command: {' '.join(sys.argv)}")
    t0 = time.time()
    config = CONFIGS[args.config]
    model, _ = train(args.out, config, ts, seed=args.seed, device=args.device,
                     workers=args.workers, log=log, resume=not args.no_resume, init=args.init,
                     real_data=args.real_data)
    log(f"training done in {time.time() - t0:.0f}s")
    model = model.cpu()
    if args.no_export:
        save_checkpoint(args.out / "model.pt", model.state_dict(), config)
    else:
        ckpt, model_dir = export_trained(model, args.out, config, log=log)
        log(f"checkpoint {ckpt}; model directory {model_dir}")
    return 0
