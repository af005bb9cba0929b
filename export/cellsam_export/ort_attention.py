"""ViT attention exported as one ONNX Runtime MultiHeadAttention node (CPU graphs only).

SAM's attention adds decomposed relative positions to the scores:

    scores = (q * scale) k^T + rel_h[q, row(k)] + rel_w[q, col(k)]

Exported as written, every global block materialises a [heads, 4096, 4096] score tensor and
reads and writes it five times (scale, two broadcast adds, softmax, product): memory-bound work
that dominates the trunks once their linear layers run in INT8. The same scores are one inner
product of augmented vectors:

    q_aug = [q * scale, rel_h[q, :], rel_w[q, :]]          (head_dim + H + W)
    k_aug = [k,         onehot(row(k)), onehot(col(k))]

so attention becomes `com.microsoft.MultiHeadAttention(q_aug, k_aug, v, scale=1)`, which ONNX
Runtime's CPU provider runs as a tiled flash attention (MLAS) that never builds the full score
matrix. Exact in real arithmetic; in FP32 it differs from the plain graph by summation order
only (~1e-6). The node is an ONNX Runtime contrib op: TensorRT and other runtimes get the plain
graphs, which is why these are written as extra files (model_dir `cpu_graphs`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from .modeling import sam as _sam  # noqa: F401  (imports segment_anything.modeling safely)
from .modeling.anchor_detr import QueryAttention

from segment_anything.modeling import image_encoder as _vit  # noqa: E402

OP_NAME = "cellsam_rt::mha"


@torch.library.custom_op(OP_NAME, mutates_args=())
def mha(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q k^T) v on packed [B, S, heads*D] tensors (no scaling: it is folded into q)."""
    b, s, _ = query.shape
    q = query.view(b, s, num_heads, -1).transpose(1, 2)
    k = key.view(b, key.shape[1], num_heads, -1).transpose(1, 2)
    v = value.view(b, value.shape[1], num_heads, -1).transpose(1, 2)
    out = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    return out.transpose(1, 2).reshape(b, s, -1)


@mha.register_fake
def _mha_fake(query, key, value, num_heads):
    return query.new_empty(query.shape[0], query.shape[1], value.shape[2])


def _mha_schema():
    """The subset of com.microsoft.MultiHeadAttention we emit (the onnx package has no contrib
    schemas, and the exporter's op evaluator needs one)."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    return OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads"),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale")])


def _mha_onnx(query, key, value, num_heads: int):
    import onnxscript

    opset = onnxscript.values.Opset("com.microsoft", 1)
    mha_op = onnxscript.values.Op(opset, "MultiHeadAttention", _mha_schema())
    return mha_op(query, key, value, num_heads=num_heads, scale=1.0)


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: our op -> com.microsoft.MultiHeadAttention."""
    return {torch.ops.cellsam_rt.mha.default: _mha_onnx}


def _key_positions(h: int, w: int, device, dtype) -> torch.Tensor:
    """[h*w, h+w]: one-hot row and one-hot column of every key token (row-major)."""
    idx = torch.arange(h * w, device=device)
    rows = nn.functional.one_hot(idx // w, h)
    cols = nn.functional.one_hot(idx % w, w)
    return torch.cat([rows, cols], dim=-1).to(dtype)


def fused_forward(self: "_vit.Attention", x: torch.Tensor) -> torch.Tensor:
    """Drop-in for segment_anything's Attention.forward, attention through `mha`."""
    b, h, w, _ = x.shape
    s, heads = h * w, self.num_heads
    # [B, S, 3, heads, D]: the channel order of SAM's qkv Linear (3, heads, D).
    q, k, v = self.qkv(x).reshape(b, s, 3, heads, -1).unbind(2)
    d = q.shape[-1]
    q_parts, k_parts = [q * self.scale], [k]
    if self.use_rel_pos:
        rh = _vit.get_rel_pos(h, h, self.rel_pos_h)  # [h, h, D]
        rw = _vit.get_rel_pos(w, w, self.rel_pos_w)  # [w, w, D]
        rq = q.reshape(b, h, w, heads, d)
        rel_h = torch.einsum("bhwnc,hkc->bhwnk", rq, rh).reshape(b, s, heads, h)
        rel_w = torch.einsum("bhwnc,wkc->bhwnk", rq, rw).reshape(b, s, heads, w)
        q_parts += [rel_h, rel_w]
        pos = _key_positions(h, w, x.device, x.dtype)
        k_parts.append(pos[None, :, None, :].expand(b, s, heads, h + w))
    q_aug = torch.cat(q_parts, dim=-1).reshape(b, s, -1)
    k_aug = torch.cat(k_parts, dim=-1).reshape(b, s, -1)
    out = mha(q_aug, k_aug, v.reshape(b, s, heads * d), heads)
    return self.proj(out.reshape(b, h, w, heads * d))


def fused_query_forward(self: QueryAttention, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> torch.Tensor:
    """Drop-in for Anchor-DETR's QueryAttention.forward (3500 queries attend to each other in
    CellFinder's decoder: a [8, 3500, 3500] score tensor per layer when exported plainly)."""
    e, nh = self.embed_dim, self.num_heads
    w, bias = self.in_proj_weight, self.in_proj_bias
    q = nn.functional.linear(query, w[:e], bias[:e]) * float(e // nh) ** -0.5
    k = nn.functional.linear(key, w[e:2 * e], bias[e:2 * e])
    v = nn.functional.linear(value, w[2 * e:], bias[2 * e:])
    return self.out_proj(mha(q, k, v, nh))


_FUSED = {_vit.Attention: fused_forward, QueryAttention: fused_query_forward}


@contextlib.contextmanager
def fused_attention(module: nn.Module) -> Iterator[int]:
    """Route every SAM ViT Attention and Anchor-DETR QueryAttention inside `module` through
    `mha` while the block runs.

    Yields the number of attention modules patched (0: nothing to fuse in this graph).
    """
    patched = [m for m in module.modules() if type(m) in _FUSED]
    for m in patched:
        m.forward = _FUSED[type(m)].__get__(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward
