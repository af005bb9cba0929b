"""The reference CellSAM inference (docs/design.md §2, whole image) rebuilt in PyTorch.

This module is the oracle for the torch-free runtime's parity tests and the baseline for its speed
benchmarks, so it keeps the reference's structure and its costs on purpose: one prompt-encoder +
mask-decoder call per box in a Python loop, every mask upsampled to full resolution on the CPU,
masks merged in numpy. It behaves like the public code's
`segment_cellular_image(img, model, normalize=True, postprocess=False)` and `CellSAM.predict`,
except that the model input size S is read from the model (1024 for the full model) and the cases
in which the reference crashes (all-zero image, no cells) return an all-zero label image.

Each stage is a public function so that tests can compare the runtime stage by stage. Comments
marked "reference:" name the public-code line whose behaviour (quirks included) is reproduced.

Where the reference code says more than docs/design.md, the code is followed: the SAM-branch
rescale's lower bound is the smallest non-zero value (not 0); with `model_cp` both branches apply
ImageNet normalisation before the per-channel min-max; top-k takes k = number of queries.
User boxes are scaled in float64 and then cast to float32; the reference scales in the dtype
torch.tensor infers from the list (float32 for Python floats), a difference of at most 1 ulp.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.exposure import equalize_adapthist, rescale_intensity

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

BBOX_THRESHOLD = 0.4
IOU_THRESHOLD = 0.5
MASK_THRESHOLD = 0.4
MIN_SIZE = 25
CLIP_PERCENTILE = 99.9  # reference: utils._percentile_threshold default
SAM_PERCENTILES = (0.0, 99.5)  # reference: AnchorDETR transforms.PercentileThreshold defaults
CLAHE_KERNEL = 128
MINMAX_EPS = 1e-6  # kornia.enhance.normalize_min_max default eps


def _channel_vector(values: Sequence[float]) -> torch.Tensor:
    # Same construction as Sam's pixel_mean/pixel_std buffers: float32, shaped [3,1,1].
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


# ---------------------------------------------------------------- 2.1-2.2 channels, normalisation


def format_image_shape(img: np.ndarray) -> np.ndarray:
    """Arrange a 2-D or 3-D image as HxWx3 float64 with its channels in the last slots (docs/design.md §2.1)."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    elif img.ndim == 3:
        # The smallest axis is taken as channels; on a tie np.argmin picks the first axis.
        channel_axis = int(np.argmin(img.shape))
        order = [a for a in range(3) if a != channel_axis] + [channel_axis]
        img = np.transpose(img, order)
    else:
        raise ValueError("Invalid image shape. Only (H, W) or (H, W, C) images are supported.")
    height, width, channels = img.shape
    if channels > 3:
        raise ValueError("A maximum of three channels is supported.")
    out = np.zeros((height, width, 3))
    out[:, :, 3 - channels:] = img
    return out


def percentile_clip(img3: np.ndarray, percentile: float = CLIP_PERCENTILE) -> np.ndarray:
    """Clip each channel at a percentile of its non-zero values, damping hot pixels (docs/design.md §2.2)."""
    out = np.zeros_like(img3)
    for c in range(img3.shape[-1]):
        channel = np.copy(img3[..., c])
        nonzero = channel[np.nonzero(channel)]
        if nonzero.size:  # a blank channel stays zero
            top = np.percentile(nonzero, percentile)
            channel[channel > top] = top
            out[..., c] = channel
    return out


def clahe_channels(img3: np.ndarray, kernel_size: int = CLAHE_KERNEL) -> np.ndarray:
    """Rescale each channel to [0,1] and equalise it with CLAHE; constant channels become 0 (in place)."""
    for c in range(img3.shape[-1]):
        channel = img3[:, :, c]
        if (channel == channel[0, 0]).all():
            img3[:, :, c] = 0.0
            continue
        channel = rescale_intensity(channel, out_range=(0.0, 1.0))
        img3[:, :, c] = equalize_adapthist(channel, kernel_size=kernel_size)
    return img3


def normalize_image(img3: np.ndarray) -> np.ndarray:
    """The reference's per-channel normalisation: 99.9th percentile clip, then CLAHE (docs/design.md §2.2)."""
    # reference: utils.normalize_image formats the (already formatted) image a second time. That is
    # a no-op unless a side is <= 3 px (the tie in np.argmin then moves H or W into the channels);
    # kept so that the oracle fails where the reference fails.
    img3 = format_image_shape(img3)
    shape = img3.shape
    return clahe_channels(percentile_clip(img3)).reshape(shape)


# ---------------------------------------------------------------- 2.3 resize


def resize_to_model(img3: np.ndarray, size: int) -> torch.Tensor:
    """Resize an HxWx3 image to a [3,S,S] float32 tensor like torchvision's v2 Resize((S,S)) (docs/design.md §2.3)."""
    # reference: model.segment_cellular_image transposes to CHW and casts with .float().
    x = torch.from_numpy(np.asarray(img3).transpose(2, 0, 1)).float()
    if tuple(x.shape[-2:]) == (size, size):
        return x  # torchvision returns the input untouched when the size already matches
    # torchvision v2 on float tensors: bilinear, align_corners=False, antialias=True by default.
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


# ---------------------------------------------------------------- 2.4 SAM branch


def sam_percentile_rescale(resized: torch.Tensor) -> torch.Tensor:
    """Rescale [3,S,S] between the min and the 99.5th percentile of all non-zero values into [0,1] (docs/design.md §2.4)."""
    arr = resized.detach().cpu().numpy().copy()  # float32 [3,S,S], as np.array(tensor)
    nonzero = arr[np.nonzero(arr)]
    if nonzero.size == 0:
        # reference: PercentileThreshold returns the tuple (img, None) here and predict crashes on it.
        return torch.from_numpy(arr)
    # The lower bound is the 0th percentile of the NON-ZERO values (their minimum), not 0.
    low, high = np.percentile(nonzero, list(SAM_PERCENTILES))
    # out_range="float32" is (0,1) when the lower bound is >= 0 and (-1,1) otherwise; when all
    # non-zero values are equal skimage only clips into that range and does not rescale.
    out = rescale_intensity(arr, in_range=(low, high), out_range="float32")
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of a [3,H,W] tensor, as torchvision's Normalize."""
    return (x - torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)) / torch.tensor(IMAGENET_STD).view(-1, 1, 1)


def min_max_per_channel(x: torch.Tensor, eps: float = MINMAX_EPS) -> torch.Tensor:
    """Per-channel min-max to [0,1] of a [3,H,W] tensor, as kornia.enhance.normalize_min_max."""
    # kornia: (max_val - min_val) * (x - min) / (max - min + eps) + min_val with (0., 1.), eps 1e-6;
    # a constant channel therefore becomes exactly 0.
    flat = x.reshape(x.shape[0], -1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1)
    return (x - low) / (high - low + eps)


def sam_pixel_normalize(x: torch.Tensor) -> torch.Tensor:
    """The forward's (x - pixel_mean/255) / (pixel_std/255) on a [0,1]-scaled tensor."""
    # reference: CellSAM.sam_preprocess(div_255=True); pixel_mean/255 is the ImageNet mean.
    return (x - _channel_vector(SAM_PIXEL_MEAN) / 255) / (_channel_vector(SAM_PIXEL_STD) / 255)


def sam_branch_input(resized: torch.Tensor, has_model_cp: bool) -> torch.Tensor:
    """Encoder input [1,3,S,S] from the resized image (docs/design.md §2.4; reference: prep_2 + forward)."""
    x = sam_percentile_rescale(resized)
    if has_model_cp:  # reference: adv_mode
        x = min_max_per_channel(imagenet_normalize(x))
    return sam_pixel_normalize(x)[None]


# ---------------------------------------------------------------- 2.5 CellFinder branch


def to_uint8_truncated(resized: torch.Tensor) -> torch.Tensor:
    """The resized [0,1] image as uint8 like ToPILImage: x*255 truncated toward zero."""
    # reference: sam_bbox_preprocessing -> ToPILImage -> to_pil_image does pic.mul(255).byte().
    return resized.detach().cpu().mul(255).byte()


def to_rgb_channels(x: torch.Tensor) -> torch.Tensor:
    """Fill an empty channel 1 from channel 2 and then an empty channel 2 from channel 1 (ToRGB)."""
    x = x.clone()
    if torch.max(x[1]) == 0:
        x[1] = x[2]
    if torch.max(x[2]) == 0:
        x[2] = x[1]
    return x


def cellfinder_branch_input(resized: torch.Tensor, has_model_cp: bool) -> torch.Tensor:
    """CellFinder input [1,3,S,S] from the resized image (docs/design.md §2.5; reference: sam_bbox_preprocessing)."""
    # reference: ResizeLongestSide(1024).apply_image runs here too; for an SxS image resized to S it
    # is the identity (with a literal 1024 it would rescale a non-1024 model's input, so we use S).
    u8 = to_uint8_truncated(resized)
    # reference: sam_preprocess(div_255=False): uint8 minus float32 buffers promotes to float32.
    x = (u8 - _channel_vector(SAM_PIXEL_MEAN)) / _channel_vector(SAM_PIXEL_STD)
    if has_model_cp:
        x = to_rgb_channels(min_max_per_channel(imagenet_normalize(x)))
    return x[None]


# ---------------------------------------------------------------- 2.6 detection


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Centre/size boxes to corner boxes, in the reference's float32 arithmetic."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def decode_detections(class_logits, boxes, size: int) -> tuple[np.ndarray, np.ndarray]:
    """All top-k (query, class) detections: xyxy boxes in S-space and scores, best first (PostProcess)."""
    logits = torch.as_tensor(class_logits, dtype=torch.float32)
    logits = logits.reshape(-1, logits.shape[-1])  # [Q,C]; a leading batch of 1 is dropped
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    num_queries, num_classes = logits.shape
    prob = logits.sigmoid()
    # reference: anchor_detr.PostProcess: k = num_queries over the flattened (query, class) pairs;
    # the class index is dropped, so one query can contribute two boxes.
    scores, index = torch.topk(prob.reshape(1, -1), num_queries, dim=1)
    query = index[0] // num_classes
    xyxy = box_cxcywh_to_xyxy(boxes)[query]
    scale = torch.tensor([size, size, size, size])  # int64, as torch.tensor(img.shape[-2:])
    return (xyxy * scale).numpy(), scores[0].numpy()


def detection_threshold(scores: np.ndarray, bbox_threshold: float = BBOX_THRESHOLD) -> float:
    """The reference's dynamic score threshold: 0.66*bbox_threshold + 0.33*mean of 2-means centres."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    data = np.asarray(scores).reshape(-1, 1)
    threshold = bbox_threshold
    if len(data) > 1:
        try:
            with warnings.catch_warnings():
                # Fewer distinct scores than clusters only warns; the result is what the reference gets.
                warnings.simplefilter("ignore", ConvergenceWarning)
                centres = KMeans(n_clusters=2, random_state=42).fit(data).cluster_centers_
            # With float32 scores this stays float32 arithmetic under numpy >= 2, as in the reference.
            threshold = 0.66 * bbox_threshold + 0.33 * np.mean(centres)
        except Exception:  # reference: bare `except: pass` keeps bbox_threshold
            pass
    return threshold


def _detect(class_logits, boxes, size, bbox_threshold):
    det_boxes, det_scores = decode_detections(class_logits, boxes, size)
    threshold = detection_threshold(det_scores, bbox_threshold)
    # reference: generate_bounding_boxes filters only when threshold > 0.0.
    if threshold > 0.0 and len(det_scores) > 0:
        keep = det_scores > threshold
        det_boxes, det_scores = det_boxes[keep], det_scores[keep]
    return det_boxes, det_scores, threshold


def detect(class_logits, boxes, size: int, bbox_threshold: float = BBOX_THRESHOLD
           ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (xyxy, S-space, unclipped) and scores above the dynamic threshold, best first (docs/design.md §2.6)."""
    det_boxes, det_scores, _ = _detect(class_logits, boxes, size, bbox_threshold)
    return det_boxes, det_scores


def scale_user_boxes(boxes, image_hw: tuple[int, int], size: int) -> np.ndarray:
    """User boxes (xyxy, image pixels) scaled per axis into S-space, as the reference's predict does."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    height, width = image_hw
    scale = np.array([size / width, size / height, size / width, size / height])
    return (arr * scale).astype(np.float32)


# ---------------------------------------------------------------- 2.7 masks


def upsample_mask_logits(low_res: torch.Tensor, size: int, image_hw: tuple[int, int]) -> torch.Tensor:
    """Mask logits [N,1,m,m] -> [N,1,H,W] via SxS, as Sam.postprocess_masks (bilinear, align_corners=False)."""
    x = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    x = x[..., :size, :size]  # no padding in this pipeline: the crop keeps everything
    return F.interpolate(x, tuple(int(v) for v in image_hw), mode="bilinear", align_corners=False)


@torch.no_grad()
def _decode_one(sam, embedding: torch.Tensor, box) -> tuple[torch.Tensor, torch.Tensor]:
    device = embedding.device
    input_box = torch.as_tensor(box, dtype=torch.float32)[None, None].to(device)  # [1,1,4]
    # The prompt encoder adds +0.5 to the box corners itself.
    sparse, dense = sam.prompt_encoder(points=None, boxes=input_box, masks=None)
    low_res, iou = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return low_res, iou


def decode_low_res_masks(model, embedding: torch.Tensor, boxes) -> tuple[np.ndarray, np.ndarray]:
    """Low-res mask logits [N,1,4h,4w] and predicted IoU [N] for each box, one decoder call per box."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    logits, ious = [], []
    for box in boxes:
        low_res, iou = _decode_one(model.sam, embedding, box)
        logits.append(low_res.cpu().numpy())
        ious.append(float(iou[0, 0]))
    mask_size = 4 * embedding.shape[-1]
    stacked = np.concatenate(logits) if logits else np.zeros((0, 1, mask_size, mask_size), np.float32)
    return stacked, np.asarray(ious, dtype=np.float32)


def decode_masks_per_box(model, embedding: torch.Tensor, boxes, image_hw: tuple[int, int],
                         iou_threshold: float = IOU_THRESHOLD, mask_threshold: float = MASK_THRESHOLD
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary full-resolution masks [K,H,W] uint8, their predicted IoUs and box indices (docs/design.md §2.7)."""
    sam = model.sam
    size = sam.image_encoder.img_size
    height, width = (int(v) for v in image_hw)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    masks, scores, kept = [], [], []
    for index, box in enumerate(boxes):
        low_res, iou = _decode_one(sam, embedding, box)
        low_res = low_res.detach().cpu()  # reference: masks are upsampled on the CPU
        if iou[0, 0] < iou_threshold:  # reference: predict drops the mask (with a warning)
            continue
        full = upsample_mask_logits(low_res, size, (height, width))
        # Sigmoid then a float32 comparison against 0.4, as nn.Sigmoid()(m) > mask_threshold.
        masks.append((torch.sigmoid(full[0, 0]) > mask_threshold).numpy().astype(np.uint8))
        scores.append(float(iou[0, 0]))
        kept.append(index)
    stacked = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
    return stacked, np.asarray(scores, dtype=np.float64), np.asarray(kept, dtype=np.int64)


# ---------------------------------------------------------------- 2.8 merge, postprocess


def merge_masks(masks: np.ndarray, image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Label image int64: mask k gets label k+1, and where masks overlap the highest label wins."""
    masks = np.asarray(masks)
    if masks.shape[0] == 0:
        shape = tuple(image_hw) if image_hw is not None else masks.shape[1:]
        return np.zeros(shape, dtype=np.int64)
    labels = np.arange(1, masks.shape[0] + 1, dtype=np.int64)[:, None, None]
    return np.max(masks * labels, axis=0)


def fill_holes_and_remove_small_masks(labels: np.ndarray, min_size: int = MIN_SIZE) -> np.ndarray:
    """The reference's (cellpose-derived) hole filling and small-mask removal, in place, quirks included."""
    if labels.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D label array, got {labels.ndim}-D")
    # Bounding boxes are taken once, before anything changes; label value v has index v - 1.
    regions = ndimage.find_objects(labels)
    next_label = 0
    for index, region in enumerate(regions):
        if region is None:
            continue
        window = labels[region]  # a view: writes go into `labels`
        own = window == index + 1  # what is left of this label after earlier fills
        count = own.sum()
        if min_size > 0 and count < min_size:
            window[own] = 0
        elif count > 0:
            if own.ndim == 3:
                for plane in range(own.shape[0]):
                    own[plane] = ndimage.binary_fill_holes(own[plane])
            else:
                own = ndimage.binary_fill_holes(own)
            # Kept labels are renumbered 1, 2, ... in order; a filled hole takes over any label in
            # it (an earlier one can vanish, so the numbering left behind can have gaps).
            window[own] = next_label + 1
            next_label += 1
    return labels


# ---------------------------------------------------------------- pipeline


@dataclass
class ReferenceResult:
    """What one reference run produced, with per-stage wall times for benchmarks."""

    labels: np.ndarray  # int64 HxW
    boxes: np.ndarray  # [N,4] float32 xyxy in S-space: the prompts given to the decoder
    scores: np.ndarray  # [N] detection scores (NaN for user boxes)
    mask_scores: np.ndarray  # [K] predicted IoU of the kept masks
    kept: np.ndarray  # [K] indices into `boxes` of the kept masks
    embeddings: np.ndarray  # [1,C,h,w] encoder output
    threshold: float | None = None  # dynamic detection threshold (None with user boxes)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_masks(self) -> int:
        """How many masks passed the IoU filter and went into the merge."""
        return int(len(self.kept))


class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = {}
        self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self._now()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now


class ReferencePipeline:
    """Whole-image reference inference for one `CellSAM` (parity oracle and speed baseline)."""

    def __init__(self, model) -> None:
        self.model = model.eval()
        self.size = int(model.sam.image_encoder.img_size)
        self.has_model_cp = bool(model.has_model_cp)

    @torch.no_grad()
    def segment(self, image: np.ndarray, bbox_threshold: float = BBOX_THRESHOLD, boxes=None,
                normalize: bool = True) -> ReferenceResult:
        """Segment one image like segment_cellular_image(normalize=True, postprocess=False)."""
        model, size = self.model, self.size
        device = next(model.parameters()).device
        clock = _Clock(device)

        img3 = format_image_shape(image)
        if normalize:
            img3 = normalize_image(img3)
        image_hw = img3.shape[:2]
        clock.lap("normalize")
        resized = resize_to_model(img3, size)
        clock.lap("resize")

        encoder_input = sam_branch_input(resized, self.has_model_cp).to(device)
        clock.lap("sam_input")
        embedding = model.sam.image_encoder(encoder_input)
        clock.lap("encoder")

        threshold = None
        if boxes is None:
            finder_input = cellfinder_branch_input(resized, self.has_model_cp).to(device)
            clock.lap("cellfinder_input")
            class_logits, raw_boxes = model.cellfinder(finder_input)
            clock.lap("cellfinder")
            prompts, scores, threshold = _detect(class_logits[0].cpu(), raw_boxes[0].cpu(), size,
                                                 bbox_threshold)
            clock.lap("detect")
        else:
            prompts = scale_user_boxes(boxes, image_hw, size)
            scores = np.full(len(prompts), np.nan, dtype=np.float32)

        masks, mask_scores, kept = decode_masks_per_box(model, embedding, prompts, image_hw)
        clock.lap("masks")
        labels = merge_masks(masks, image_hw)
        clock.lap("merge")
        if len(kept):  # reference: with no mask at all it crashes; we return the zero labels
            labels = fill_holes_and_remove_small_masks(labels, min_size=MIN_SIZE)
        clock.lap("postprocess")
        clock.times["total"] = sum(clock.times.values())

        return ReferenceResult(
            labels=labels, boxes=prompts, scores=scores, mask_scores=mask_scores, kept=kept,
            embeddings=embedding.cpu().numpy(), threshold=threshold, timings=clock.times,
        )


def load_reference(checkpoint_path: str | Path) -> ReferencePipeline:
    """A reference pipeline for a checkpoint file, loaded with our strict loader."""
    from .checkpoint import load_checkpoint

    model, _info = load_checkpoint(checkpoint_path)
    return ReferencePipeline(model)
