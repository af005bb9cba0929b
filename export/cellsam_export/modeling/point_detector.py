"""PointDetector: a light one-to-one anchor-point detector standing in for CellFinder in small models.

Every cell of the output feature grid (stride 8 or 16) is one query whose anchor is the grid
cell's centre. Training assigns each ground-truth cell to the single anchor whose grid cell holds
the cell's centre, so the outputs are decoded exactly like CellFinder's (sigmoid, top-k over
(query, class) pairs, k-means threshold, no NMS).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["PointDetector", "point_detector_settings", "DEFAULT_POINT_DETECTOR"]

# Sizes of the detector; a config's `point_detector` dict overrides any of them.
DEFAULT_POINT_DETECTOR: dict[str, Any] = {
    "stride": 8,            # output grid stride in input pixels (8 or 16)
    "widths": [16, 32, 64, 96, 128],  # channels at strides 2, 4, 8, 16, 32
    "head_dim": 64,         # channels of the stride-`stride` head features
    "prior_size": 0.05,     # initial box width/height as a fraction of the image
    "prior_prob": 0.01,     # initial class probability (focal-loss prior)
}


def point_detector_settings(config: Any) -> dict[str, Any]:
    """Detector sizes from a CellSAMConfig (its `point_detector` dict) merged over the defaults."""
    extra = getattr(config, "point_detector", None)
    if extra is None and isinstance(config, Mapping):
        extra = config.get("point_detector")
    settings = dict(DEFAULT_POINT_DETECTOR)
    settings.update(dict(extra or {}))
    return settings


def _image_size(config: Any) -> int:
    if isinstance(config, Mapping):
        return int(config["image_size"])
    return int(config.image_size)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of an NCHW tensor (as SAM's neck uses)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each pixel's channel vector, then scale and shift."""
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvGN(nn.Sequential):
    """3x3 convolution, per-pixel channel LayerNorm, ReLU.

    The norm looks at one pixel only (unlike BatchNorm/GroupNorm), so the detector is exactly
    translation-equivariant: it can be trained on crops and run on whole images.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
            LayerNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Residual(nn.Module):
    """A dilated ConvGN block with an identity shortcut (grows the receptive field cheaply)."""

    def __init__(self, ch: int, dilation: int) -> None:
        super().__init__()
        self.body = ConvGN(ch, ch, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the block's output to its input."""
        return x + self.body(x)


class PointDetector(nn.Module):
    """Image [B,3,S,S] -> (class_logits [B,Q,2], boxes [B,Q,4] cxcywh in 0..1), Q = (S/stride)^2."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        s = point_detector_settings(config)
        self.image_size = _image_size(config)
        self.stride = int(s["stride"])
        if self.stride not in (8, 16) or self.image_size % 32:
            raise ValueError(f"PointDetector needs stride 8 or 16 and S divisible by 32, got {self.stride}, {self.image_size}")
        w2, w4, w8, w16, w32 = (int(v) for v in s["widths"])
        hd = int(s["head_dim"])
        self.stem = nn.Sequential(ConvGN(3, w2, stride=2), ConvGN(w2, w4, stride=2))
        self.down8 = nn.Sequential(ConvGN(w4, w8, stride=2), Residual(w8, 1))
        self.down16 = nn.Sequential(ConvGN(w8, w16, stride=2), Residual(w16, 1), Residual(w16, 2))
        self.down32 = nn.Sequential(ConvGN(w16, w32, stride=2), Residual(w32, 1), Residual(w32, 2))
        # Top-down path: coarse context (is this the middle of a cell?) reaches the output grid.
        self.lat32 = nn.Conv2d(w32, hd, 1)
        self.lat16 = nn.Conv2d(w16, hd, 1)
        self.lat8 = nn.Conv2d(w8, hd, 1) if self.stride == 8 else None
        self.head = nn.Sequential(ConvGN(hd, hd), Residual(hd, 1), Residual(hd, 2))
        self.class_head = nn.Conv2d(hd, 2, 1)
        self.box_head = nn.Conv2d(hd, 4, 1)
        nn.init.constant_(self.class_head.bias, -math.log((1 - s["prior_prob"]) / s["prior_prob"]))
        nn.init.normal_(self.box_head.weight, std=1e-3)
        prior = math.log(s["prior_size"] / (1 - s["prior_size"]))
        with torch.no_grad():
            self.box_head.bias.copy_(torch.tensor([0.0, 0.0, prior, prior]))
        g = self.image_size // self.stride
        centres = (torch.arange(g, dtype=torch.float32) + 0.5) / g
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        anchors = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=-1)  # [Q,2] (x, y) in 0..1
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("anchor_logits", torch.log(anchors / (1 - anchors)), persistent=False)

    @property
    def grid_size(self) -> int:
        """Side of the query grid (S / stride)."""
        return self.image_size // self.stride

    @property
    def num_queries(self) -> int:
        """Number of queries Q (one per grid cell)."""
        return self.grid_size ** 2

    @property
    def num_classes(self) -> int:
        """Class columns of the logits (class 0 = cell, class 1 = a trained negative)."""
        return 2

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Head features [B,hd,S/stride,S/stride]."""
        x4 = self.stem(image)
        x8 = self.down8(x4)
        x16 = self.down16(x8)
        x32 = self.down32(x16)
        y = self.lat16(x16) + F.interpolate(self.lat32(x32), scale_factor=2.0, mode="nearest")
        if self.lat8 is not None:
            y = self.lat8(x8) + F.interpolate(y, scale_factor=2.0, mode="nearest")
        return self.head(y)

    def anchor_logits_at(self, origin: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """Inverse-sigmoid anchor centres [gh*gw,2] of a grid whose top-left lies at `origin` (y, x) px."""
        oy, ox = origin
        gh, gw = grid
        dev = self.anchors.device
        ys = (oy + (torch.arange(gh, dtype=torch.float32, device=dev) + 0.5) * self.stride) / self.image_size
        xs = (ox + (torch.arange(gw, dtype=torch.float32, device=dev) + 0.5) * self.stride) / self.image_size
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        a = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=-1)
        return torch.log(a / (1 - a))

    def predict(self, image: torch.Tensor, anchor_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and cxcywh boxes for an image (or crop) whose anchors are given."""
        f = self.features(image)
        logits = self.class_head(f).flatten(2).transpose(1, 2)
        raw = self.box_head(f).flatten(2).transpose(1, 2)
        centre = torch.sigmoid(raw[..., :2] + anchor_logits)
        size = torch.sigmoid(raw[..., 2:])
        return logits, torch.cat([centre, size], dim=-1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits [B,Q,2] and boxes [B,Q,4] (cx,cy,w,h normalised to 0..1) for every anchor."""
        return self.predict(image, self.anchor_logits)
