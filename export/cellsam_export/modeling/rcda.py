"""Row-column decoupled attention (RCDA) from Anchor-DETR, written for inference and export.

A query attends to a feature map [H, W] through two small softmaxes instead of one over H*W:
one over the W column positions (keys averaged over rows) and one over the H row positions
(keys averaged over columns); the value map is contracted with both. Parameter names and the
packed projection layout (q_row, q_col, k_row, k_col, v stacked in `in_proj_weight`) follow the
reference checkpoint, so its weights load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiheadRCDA(nn.Module):
    """Multi-head row-column decoupled attention with the reference's packed parameters."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(5 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(5 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _proj(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Apply the `slot`-th of the five packed input projections."""
        e = self.embed_dim
        return F.linear(x, self.in_proj_weight[slot * e:(slot + 1) * e],
                        self.in_proj_bias[slot * e:(slot + 1) * e])

    def forward(self, query_row: torch.Tensor, query_col: torch.Tensor, key_row: torch.Tensor,
                key_col: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attend queries [B,L,E] to a map (keys/value [B,H,W,E]); returns [B,L,E].

        No padding mask: inference always sees the whole (unpadded) image, where the reference's
        mask is all False and has no effect.
        """
        b, l, e = query_row.shape
        h, w = value.shape[1], value.shape[2]
        nh, hd = self.num_heads, self.head_dim
        scale = float(hd) ** -0.5
        q_row = (self._proj(query_row, 0) * scale).reshape(b, l, nh, hd).transpose(1, 2)
        q_col = (self._proj(query_col, 1) * scale).reshape(b, l, nh, hd).transpose(1, 2)
        # Averaging before the (affine) projection equals the reference's project-then-average
        # and costs H (or W) times less.
        k_row = self._proj(key_row.mean(1), 2).reshape(b, w, nh, hd).transpose(1, 2)
        k_col = self._proj(key_col.mean(2), 3).reshape(b, h, nh, hd).transpose(1, 2)
        v = self._proj(value, 4).reshape(b, h, w, nh, hd).permute(0, 3, 1, 2, 4)  # [B,nh,H,W,hd]

        a_row = torch.softmax(q_row @ k_row.transpose(-1, -2), dim=-1)  # [B,nh,L,W]
        a_col = torch.softmax(q_col @ k_col.transpose(-1, -2), dim=-1)  # [B,nh,L,H]

        # Contract the shorter side first (the reference does the same; results agree either way).
        if h < w:
            t = (a_row @ v.transpose(2, 3).reshape(b, nh, w, h * hd)).reshape(b, nh, l, h, hd)
            out = (a_col.unsqueeze(-2) @ t).squeeze(-2)
        else:
            t = (a_col @ v.reshape(b, nh, h, w * hd)).reshape(b, nh, l, w, hd)
            out = (a_row.unsqueeze(-2) @ t).squeeze(-2)
        out = out.transpose(1, 2).reshape(b, l, e)
        return self.out_proj(out)
