"""Sizes of the shipped small model ("cellsam-rt-small") and its training hyper-parameters."""
from __future__ import annotations

from dataclasses import dataclass, replace

from cellsam_export.build import CellSAMConfig

from .synth import KINDS

MODEL_NAME = "cellsam-rt-small"

# 512 px input: a typical 512x512 nuclei image keeps its scale (nuclei ~20-30 px).
# Patch 8: a 64x64 embedding and 256x256 low-res masks (2 px per mask pixel). With patch 16 the
# box-prompted masks stayed poor even from ground-truth boxes (img2d: F1@0.5 0.72,
# mean IoU 0.67; training Dice ~0.75 on synthetic cells): a 24 px nucleus was 1.5 tokens wide
# and touching nuclei could not be told apart at that grid.
# Windowed attention only (no global blocks): every block is then local, so the model can be
# trained on crops placed at window-aligned positions of the 512 frame (much cheaper steps).
SMALL_CONFIG = CellSAMConfig(
    image_size=512,
    patch_size=8,
    sam_width=128, sam_depth=4, sam_heads=4, sam_window=8, sam_global_attn=(),
    prompt_dim=128, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=512,
    num_multimask_outputs=3, iou_head_hidden=128, mask_in_chans=16,
    num_queries=(512 // 8) ** 2, num_classes=2,
    detector="point",
    point_detector={"stride": 8, "widths": [16, 32, 64, 96, 128], "head_dim": 64,
                    "prior_size": 0.05, "prior_prob": 0.01},
)

# The first shipped model (run 3, patch 16); the current one starts from its weights.
SMALL_CONFIG_V1 = replace(SMALL_CONFIG, patch_size=16)


@dataclass
class TrainSettings:
    """Optimisation settings; the defaults are what produced the shipped model."""

    steps: int = 5000             # all steps; the last `full_frame_steps` see whole frames
    batch_size: int = 4           # crops per step
    crop: int = 192               # crop side in model pixels (the full frame is image_size)
    boxes_per_image: int = 16     # prompted cells per crop for the mask losses
    # Phase 2: whole S x S frames, so the decoder's attention gets used to the full token grid
    # it sees at inference (crops show it 1/4 of the tokens). Its own cosine schedule starts at
    # full_frame_lr x lr.
    full_frame_steps: int = 400
    full_frame_batch: int = 1
    full_frame_boxes: int = 32
    full_frame_lr: float = 0.25
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup: int = 100
    grad_clip: float = 1.0
    box_jitter: float = 0.1       # std of box-corner noise, as a fraction of the box side
    synth_version: int = 3        # cellsam_train.synth generator version
    # Rehearsal: this share of the synthetic examples comes from an earlier generator version
    # (the data the init checkpoint learned from), so that a fine-tune keeps what it knew.
    replay_version: int = 0
    replay_fraction: float = 0.0
    # Weight of the init model's detector as a teacher on the replay examples (0: off).
    replay_distill: float = 0.0
    # A share of the synth_version examples drawn with one held-out regime forced (synth_v4
    # REGIMES; "" off): more of the images the model reads worst.
    focus_regime: str = ""
    focus_fraction: float = 0.0
    # The synthetic kinds drawn (synth.KINDS): ("nuclei", "cells2") leaves out whole cells in one
    # channel, which look like the cytoplasm a nuclear stain shows faintly around its nuclei.
    kinds: tuple = KINDS
    # A share of the synthetic examples under extra camera noise (train.extra_noise): images
    # whose intensity span is only a few noise deviations, where the detector misses nuclei.
    noise_fraction: float = 0.0
    real_fraction: float = 0.0    # share of examples drawn from --real-data images (if given)
    real_mask_weight: float = 1.0  # weight of real images' masks in the mask losses
    # Objects a real image's annotators painted in another class (mnfinder's micronuclei):
    # "background" counts them as negatives; "ignore" leaves the anchors that would find them
    # out of the classification loss (tried: it did not keep the detector's recall elsewhere).
    unlabelled: str = "background"
    # "all", or "detector": only CellFinder trains; the encoder, prompt encoder and mask decoder
    # stay at the init weights, so a fine-tune for detection leaves the masks exactly as they were.
    train_parts: str = "all"
    # Start the detector from its random init instead of --init's (the rest still from --init):
    # a detector trained from scratch on new data rather than fine-tuned toward it.
    fresh_detector: bool = False
    pe_scale: float = 8.0         # scale of SAM's random Fourier positional features at init
    assign: str = "quality"       # "quality": best-predicting anchor near the centre; "centre"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    w_class: float = 2.0
    w_l1: float = 5.0
    w_giou: float = 2.0
    w_mask_bce: float = 1.0
    w_mask_dice: float = 1.0
    w_iou: float = 1.0
