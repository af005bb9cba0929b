"""CellFinder: CellSAM's box detector (a SAM ViT trunk feeding Anchor-DETR)."""
from __future__ import annotations

import torch
from torch import nn

from .anchor_detr import AnchorDETR


class CellFinder(nn.Module):
    """Cell detector; `decode_head` holds the Anchor-DETR so checkpoint keys read `cellfinder.decode_head.*`."""

    def __init__(self, decode_head: AnchorDETR) -> None:
        super().__init__()
        self.decode_head = decode_head

    @property
    def num_queries(self) -> int:
        """Number of box queries per image (patterns x anchor points)."""
        t = self.decode_head.transformer
        return t.num_patterns * t.num_queries

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B,3,S,S] normalised -> (class_logits [B,Q,2] raw, boxes [B,Q,4] cxcywh sigmoid 0..1).

        Outputs are the last decoder layer's, which is all the reference's inference reads.
        """
        return self.decode_head(image)
