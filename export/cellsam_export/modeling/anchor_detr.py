"""Anchor-DETR as CellSAM's CellFinder uses it, reduced to the inference path.

Single feature level, learned anchor points, RCDA attention, no padding mask (inference always
sees a whole image), heads evaluated on the last decoder layer only. Module and parameter names
mirror the reference so that `cellfinder.decode_head.*` checkpoint keys load unchanged.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .rcda import MultiheadRCDA
from .sam import ImageEncoderViT


def pos2posemb1d(pos: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of positions in [0,1] -> [..., num_feats] (interleaved sin/cos)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    x = pos[..., None] * (2 * math.pi) / dim_t
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def pos2posemb2d(pos: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of (x, y) points in [0,1] -> [..., 2*num_feats], y features first."""
    return torch.cat((pos2posemb1d(pos[..., 1], num_feats, temperature),
                      pos2posemb1d(pos[..., 0], num_feats, temperature)), dim=-1)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of x clamped to [0,1], as the reference applies it to anchor points."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class FFN(nn.Module):
    """Residual feed-forward block with post-LayerNorm (Anchor-DETR's `ffn`)."""

    def __init__(self, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(x), then LayerNorm."""
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers, ReLU after all but the last."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class QueryAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names, as explicit ops.

    Explicit matmul/softmax (rather than nn.MultiheadAttention's fused fast path) keeps the
    ONNX graph plain and lets FP16 conversion keep the softmax in FP32.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Batch-first attention: query [B,L,E], key/value [B,S,E] -> [B,L,E]."""
        e, nh = self.embed_dim, self.num_heads
        hd = e // nh
        w, bias = self.in_proj_weight, self.in_proj_bias
        b, l, _ = query.shape
        s = key.shape[1]
        q = F.linear(query, w[:e], bias[:e]).reshape(b, l, nh, hd).transpose(1, 2)
        k = F.linear(key, w[e:2 * e], bias[e:2 * e]).reshape(b, s, nh, hd).transpose(1, 2)
        v = F.linear(value, w[2 * e:], bias[2 * e:]).reshape(b, s, nh, hd).transpose(1, 2)
        attn = torch.softmax((q * float(hd) ** -0.5) @ k.transpose(-1, -2), dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, l, e))


class EncoderLayer(nn.Module):
    """Anchor-DETR encoder layer: RCDA self-attention over the feature map, then FFN."""

    def __init__(self, d_model: int, nhead: int, d_ffn: int) -> None:
        super().__init__()
        self.self_attn = MultiheadRCDA(d_model, nhead)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn)

    def forward(self, src: torch.Tensor, posemb_row: torch.Tensor, posemb_col: torch.Tensor) -> torch.Tensor:
        """src [B,H,W,C] channels-last; posemb_row [W,C] varies along x, posemb_col [H,C] along y."""
        b, h, w, c = src.shape
        q_row = src + posemb_row[None, None]
        q_col = src + posemb_col[None, :, None]
        src2 = self.self_attn(q_row.reshape(b, h * w, c), q_col.reshape(b, h * w, c),
                              q_row, q_col, src)
        src = self.norm1(src + src2.reshape(b, h, w, c))
        return self.ffn(src)


class DecoderLayer(nn.Module):
    """Anchor-DETR decoder layer: query self-attention, RCDA cross-attention, FFN."""

    def __init__(self, d_model: int, nhead: int, d_ffn: int) -> None:
        super().__init__()
        self.cross_attn = MultiheadRCDA(d_model, nhead)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = QueryAttention(d_model, nhead)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn)

    def forward(self, tgt: torch.Tensor, src: torch.Tensor, query_pos: torch.Tensor,
                query_pos_x: torch.Tensor, query_pos_y: torch.Tensor,
                key_row: torch.Tensor, key_col: torch.Tensor) -> torch.Tensor:
        """tgt [B,Q,C]; src/key_row/key_col [B,H,W,C]; query position embeddings [Q,C]."""
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt))
        tgt2 = self.cross_attn(tgt + query_pos_x, tgt + query_pos_y, key_row, key_col, src)
        tgt = self.norm1(tgt + tgt2)
        return self.ffn(tgt)


class AnchorDETRTransformer(nn.Module):
    """Anchor-DETR transformer: RCDA encoder, anchor-point queries, decoder, class/box heads."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024,
                 num_queries: int = 3500, num_patterns: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        if d_model % 2:
            raise ValueError("d_model must be even (2-D sine embedding)")
        self.d_model = d_model
        self.num_queries = num_queries
        self.num_patterns = num_patterns
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_decoder_layers))
        self.pattern = nn.Embedding(num_patterns, d_model)
        self.position = nn.Embedding(num_queries, 2)
        nn.init.uniform_(self.position.weight, 0, 1)
        self.adapt_pos2d = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.adapt_pos1d = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        # One head per decoder layer, as in the checkpoint; inference reads only the last.
        self.class_embed = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(num_decoder_layers))
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(num_decoder_layers))

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B,C,H,W] projected features -> (class logits [B,Q,K], boxes [B,Q,4] cxcywh 0..1)."""
        b, c, h, w = src.shape
        # The reference derives positions from an all-False padding mask: cell centres (i+0.5)/n.
        ys = (torch.arange(h, dtype=src.dtype, device=src.device) + 0.5) / h
        xs = (torch.arange(w, dtype=src.dtype, device=src.device) + 0.5) / w
        posemb_row = self.adapt_pos1d(pos2posemb1d(xs, c))  # [W,C]
        posemb_col = self.adapt_pos1d(pos2posemb1d(ys, c))  # [H,C]

        x = src.permute(0, 2, 3, 1)
        for layer in self.encoder_layers:
            x = layer(x, posemb_row, posemb_col)

        # Queries: every pattern paired with every anchor point (pattern-major order).
        nq = self.num_patterns * self.num_queries
        ref = self.position.weight.repeat(self.num_patterns, 1)  # [P*Q,2]
        tgt = self.pattern.weight[:, None, :].expand(self.num_patterns, self.num_queries, c).reshape(nq, c)
        tgt = tgt[None].expand(b, nq, c)
        # Anchors are fixed across layers, so their embeddings are computed once.
        query_pos = self.adapt_pos2d(pos2posemb2d(ref, c // 2))
        query_pos_x = self.adapt_pos1d(pos2posemb1d(ref[:, 0], c))
        query_pos_y = self.adapt_pos1d(pos2posemb1d(ref[:, 1], c))
        key_row = x + posemb_row[None, None]
        key_col = x + posemb_col[None, :, None]
        for layer in self.decoder_layers:
            tgt = layer(tgt, x, query_pos, query_pos_x, query_pos_y, key_row, key_col)

        logits = self.class_embed[-1](tgt)
        delta = self.bbox_embed[-1](tgt)
        offset = torch.cat([inverse_sigmoid(ref), torch.zeros_like(ref)], dim=-1)  # centre only
        boxes = torch.sigmoid(delta + offset)
        return logits, boxes


class ViTTrunk(nn.Module):
    """SAM ViT without its neck: patch embed + absolute pos embed + blocks -> [B,C,S/16,S/16]."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 window_size: int, global_attn_indexes: Sequence[int]) -> None:
        super().__init__()
        vit = ImageEncoderViT(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=window_size, global_attn_indexes=tuple(global_attn_indexes))
        # Keep the ViT's own submodules (same names as the reference's trunk), drop the neck.
        self.patch_embed = vit.patch_embed
        self.pos_embed = vit.pos_embed
        self.blocks = vit.blocks
        self.num_channels = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """image [B,3,S,S] -> features [B,C,S/p,S/p]."""
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


class Backbone(nn.Module):
    """Holder that puts the trunk under the reference's `backbone.body` name."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the trunk."""
        return self.body(x)


class AnchorDETR(nn.Module):
    """Trunk + input projection (conv1x1 + GroupNorm(32)) + Anchor-DETR transformer."""

    def __init__(self, trunk: ViTTrunk, transformer: AnchorDETRTransformer) -> None:
        super().__init__()
        self.transformer = transformer
        hidden = transformer.d_model
        self.input_proj = nn.ModuleList([nn.Sequential(
            nn.Conv2d(trunk.num_channels, hidden, kernel_size=1), nn.GroupNorm(32, hidden))])
        self.backbone = Backbone(trunk)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B,3,S,S] normalised -> (class logits [B,Q,K], boxes [B,Q,4] cxcywh 0..1)."""
        return self.transformer(self.input_proj[0](self.backbone(image)))
