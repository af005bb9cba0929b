"""ONNX Runtime CPU variants of the trunks: fused attention and bias-GELU (contrib ops).

**Attention.** SAM's attention adds decomposed relative positions to the scores:

    scores = (q * scale) k^T + rel_h[q, row(k)] + rel_w[q, col(k)]

Exported as written, every global block materialises a [heads, 4096, 4096] score tensor and
reads and writes it five times (scale, two broadcast adds, softmax, product): memory-bound work
that dominates the trunks once their linear layers run in INT8. The same scores are one inner
product of augmented vectors:

    q_aug = [q * scale, rel_h[q, :], rel_w[q, :]]          (head_dim + H + W)
    k_aug = [k,         onehot(row(k)), onehot(col(k))]

so attention becomes `com.microsoft.MultiHeadAttention(q_aug, k_aug, v, scale=1)`, which ONNX
Runtime's CPU provider runs as a tiled flash attention (MLAS) that never builds the score
matrix. The one-hot products add rel_h and rel_w exactly, after q.k, as the original does.
Anchor-DETR's query self-attention (3500 queries in CellFinder's decoder) goes the same way.

**Global attention** (64x64 tokens, no windows) is where the one-hot columns cost most: 3x the
q.k arithmetic of the model over 4096 keys. There the graphs call `com.cellsam.RelPosAttention`
(q, k, v, rel_h, rel_w) instead, cellsam-rt's own CPU kernel (runtime/cellsam_rt/kernels/),
which adds rel_h and rel_w per key row and column as it finishes each tile of scores, without
the extra columns (benchmarks/test_bench_attention.py; figures in docs/performance.md). Windowed
blocks (14x14 tokens) stay on MultiHeadAttention, which is faster there.

**MLP.** `lin2(GELU(lin1(x)))` exports as MatMul, bias Add and five element-wise GELU passes
over [tokens, 3072]; `com.microsoft.BiasGelu` does the bias and the exact (erf) GELU in one.

The relative-position terms are batched MatMuls instead of Einsum (ONNX Runtime's CPU Einsum
runs them far below its MatMul speed). In FP32 the variant differs from the plain graph by summation order only
(~1e-6). The contrib ops run in ONNX Runtime only: TensorRT and other runtimes get the plain
graphs, which is why these are written as extra files (manifest `cpu_graphs`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from .modeling import sam as _sam  # noqa: F401  (imports segment_anything.modeling safely)
from .modeling.anchor_detr import QueryAttention

from segment_anything.modeling import common as _common  # noqa: E402
from segment_anything.modeling import image_encoder as _vit  # noqa: E402


@torch.library.custom_op("cellsam_rt::mha", mutates_args=())
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


@torch.library.custom_op("cellsam_rt::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU (erf form) of x + bias."""
    return nn.functional.gelu(x + bias)


@bias_gelu.register_fake
def _bias_gelu_fake(x, bias):
    return torch.empty_like(x)


# Tokens from which a relative-position attention runs as com.cellsam.RelPosAttention: the
# 64x64 global blocks (the kernel loses to MultiHeadAttention on 14x14 windows).
RELPOS_MIN_TOKENS = 1024
CELLSAM_DOMAIN = "com.cellsam"


@torch.library.custom_op("cellsam_rt::relpos_attention", mutates_args=())
def relpos_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + rel_h[q, row(k)] + rel_w[q, col(k)]) v; q/k/v packed [B, S, heads*D]
    (q already scaled), rel_h [B, S, heads, H], rel_w [B, S, heads, W], S = H*W row-major."""
    b, s, heads, h = rel_h.shape
    w = rel_w.shape[-1]
    q = query.view(b, s, heads, -1).transpose(1, 2)
    k = key.view(b, s, heads, -1).transpose(1, 2)
    v = value.view(b, s, heads, -1).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)).view(b, heads, s, h, w)
    scores = scores + rel_h.transpose(1, 2)[..., :, None] + rel_w.transpose(1, 2)[..., None, :]
    out = torch.softmax(scores.view(b, heads, s, s), dim=-1) @ v
    return out.transpose(1, 2).reshape(b, s, -1)


@relpos_attention.register_fake
def _relpos_attention_fake(query, key, value, rel_h, rel_w):
    return query.new_empty(query.shape[0], query.shape[1], value.shape[2])


def _schema(name: str, inputs: list[str], attributes: dict, domain: str = "com.microsoft"):
    """A minimal OpSchema for a contrib or cellsam op: the onnx package has no schemas for
    them, and the exporter's op evaluator needs one."""
    from onnx.defs import OpSchema

    return OpSchema(
        name, domain, 1,
        inputs=[OpSchema.FormalParameter(i, "T") for i in inputs],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[OpSchema.Attribute(k, t, k) for k, t in attributes.items()])


def _contrib_op(name: str, inputs: list[str], attributes: dict, domain: str = "com.microsoft"):
    import onnxscript

    opset = onnxscript.values.Opset(domain, 1)
    return onnxscript.values.Op(opset, name, _schema(name, inputs, attributes, domain))


def _mha_onnx(query, key, value, num_heads: int):
    from onnx.defs import OpSchema

    op = _contrib_op("MultiHeadAttention", ["query", "key", "value"],
                     {"num_heads": OpSchema.AttrType.INT, "scale": OpSchema.AttrType.FLOAT})
    return op(query, key, value, num_heads=num_heads, scale=1.0)


def _bias_gelu_onnx(x, bias):
    return _contrib_op("BiasGelu", ["A", "B"], {})(x, bias)


def _relpos_attention_onnx(query, key, value, rel_h, rel_w):
    op = _contrib_op("RelPosAttention", ["query", "key", "value", "rel_h", "rel_w"], {},
                     CELLSAM_DOMAIN)
    return op(query, key, value, rel_h, rel_w)


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: our ops -> their contrib/cellsam nodes."""
    return {torch.ops.cellsam_rt.mha.default: _mha_onnx,
            torch.ops.cellsam_rt.bias_gelu.default: _bias_gelu_onnx,
            torch.ops.cellsam_rt.relpos_attention.default: _relpos_attention_onnx}


def _key_positions(h: int, w: int, device, dtype) -> torch.Tensor:
    """[h*w, h+w]: one-hot row and one-hot column of every key token (row-major)."""
    idx = torch.arange(h * w, device=device)
    rows = nn.functional.one_hot(idx // w, h)
    cols = nn.functional.one_hot(idx % w, w)
    return torch.cat([rows, cols], dim=-1).to(dtype)


def _rel_terms(rq: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor):
    """rel_h [B,H,W,n,H] and rel_w [B,H,W,n,W] of SAM's decomposed rel-pos, as batched MatMuls.

    rq [B,H,W,n,C] (unscaled queries), rh [H,H,C], rw [W,W,C]: rel_h[b,y,x,n,k] =
    rq[b,y,x,n,:] . rh[y,k,:], rel_w[b,y,x,n,k] = rq[b,y,x,n,:] . rw[x,k,:].
    """
    b, h, w, n, c = rq.shape
    by_row = rq.permute(1, 0, 2, 3, 4).reshape(h, b * w * n, c)
    rel_h = (by_row @ rh.transpose(1, 2)).reshape(h, b, w, n, h).permute(1, 0, 2, 3, 4)
    by_col = rq.permute(2, 0, 1, 3, 4).reshape(w, b * h * n, c)
    rel_w = (by_col @ rw.transpose(1, 2)).reshape(w, b, h, n, w).permute(1, 2, 0, 3, 4)
    return rel_h, rel_w


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
        rel_h, rel_w = _rel_terms(q.reshape(b, h, w, heads, d), rh, rw)
        if getattr(self, "_cellsam_relpos_kernel", False) and s >= RELPOS_MIN_TOKENS:
            out = relpos_attention((q * self.scale).reshape(b, s, heads * d),
                                   k.reshape(b, s, heads * d), v.reshape(b, s, heads * d),
                                   rel_h.reshape(b, s, heads, h), rel_w.reshape(b, s, heads, w))
            return self.proj(out.reshape(b, h, w, heads * d))
        q_parts += [rel_h.reshape(b, s, heads, h), rel_w.reshape(b, s, heads, w)]
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


def fused_mlp_forward(self: "_common.MLPBlock", x: torch.Tensor) -> torch.Tensor:
    """Drop-in for SAM's MLPBlock.forward (exact GELU only): bias + GELU as one BiasGelu."""
    return self.lin2(bias_gelu(x @ self.lin1.weight.t(), self.lin1.bias))


def _fusable(m: nn.Module) -> bool:
    if type(m) is _common.MLPBlock:
        act = m.act
        return (type(act) is nn.GELU and act.approximate == "none"
                and m.lin1.bias is not None)
    return type(m) in _FUSED


_FUSED = {_vit.Attention: fused_forward, QueryAttention: fused_query_forward,
          _common.MLPBlock: fused_mlp_forward}


def count_attention(module: nn.Module) -> int:
    """Attention modules inside `module` that `fused_attention` would route through MHA."""
    return sum(_fusable(m) and type(m) is not _common.MLPBlock for m in module.modules())


@contextlib.contextmanager
def fused_attention(module: nn.Module, relpos_kernel: bool = True) -> Iterator[int]:
    """Route every SAM ViT Attention, Anchor-DETR QueryAttention and (exact-GELU) SAM MLPBlock
    inside `module` through the contrib ops above while the block runs; with `relpos_kernel`,
    global relative-position attention goes to com.cellsam.RelPosAttention (cellsam-rt's own
    kernel), else to MultiHeadAttention like the windowed blocks.

    Yields the number of attention modules patched (0: nothing to fuse in this graph).
    """
    patched = [m for m in module.modules() if _fusable(m)]
    for m in patched:
        m.forward = _FUSED[type(m)].__get__(m)
        if type(m) is _vit.Attention:
            m._cellsam_relpos_kernel = bool(relpos_kernel)
    try:
        yield count_attention(module)
    finally:
        for m in patched:
            del m.forward
            if type(m) is _vit.Attention:
                del m._cellsam_relpos_kernel


def custom_ops(model) -> list[str]:
    """"domain.Op" of every node of an onnx ModelProto outside ONNX and ONNX Runtime's contrib
    ops: what a runtime must provide besides onnxruntime to load the graph."""
    standard = ("", "ai.onnx", "com.microsoft")
    return sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in standard})
