"""SAM's two-way transformer and mask upscaling, rearranged for a few tokens per box.

The arithmetic is that of segment-anything's `TwoWayTransformer` and `MaskDecoder.output_upscaling`
(same modules, same parameters); only the order of evaluation changes, exactly in real arithmetic:

- Projections on the token side: each box has 7 tokens against 4096 image tokens, so in the cross
  attentions the projections of the image tokens (k/v of token-to-image, q and out of
  image-to-token) are folded into the few token-side vectors instead: (q Wk) x rather than
  q (Wk x). The image tokens are only ever multiplied by [C, heads*7] matrices.
- No head transposes: heads are kept apart by block-diagonal masks on the token side (a zero
  block adds exact zeros), so the [N,HW,C] tensors stay in their natural layout.
- Upscaling in token space: each image token's output pixels depend on that token alone (both
  transposed convolutions have kernel = stride = 2), so the upscaling runs as matmuls on the
  [N,HW,C] tokens (LayerNorm2d = LayerNorm over each output pixel's channels) and the
  hypernetwork dot product is taken before the 16 sub-pixels of a token are scattered into the
  4x finer mask.

Per full-size box this counts 2.1 GFLOP instead of 3.6, with no ConvTranspose and no transpose
of a whole feature map.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TwoWayPerBox(nn.Module):
    """segment-anything's TwoWayTransformer for N boxes over T images, rearranged (see above)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        cross = transformer.final_attn_token_to_image
        heads, dim = cross.num_heads, cross.internal_dim
        # head_mask[h, d] = 1 where channel d belongs to head h
        self.register_buffer("head_mask", torch.eye(heads).repeat_interleave(dim // heads, dim=1),
                             persistent=False)

    def _spread(self, x: torch.Tensor) -> torch.Tensor:
        """[N,K,D] -> [N,heads*K,D]: row (h,k) is x[:,k] with all but head h's channels zeroed."""
        n, k, d = x.shape
        return (x.unsqueeze(1) * self.head_mask[None, :, None, :]).reshape(n, -1, d)

    def _tokens_to_image(self, attn: nn.Module, queries: torch.Tensor, image_pe: torch.Tensor,
                         image: torch.Tensor) -> torch.Tensor:
        """SAM Attention(q=queries, k=image_pe, v=image): few tokens [N,K,C] over [N,HW,C].

        The key and value projections are moved to the token side, where they cost K rows
        instead of HW: q.k_proj(x) = (q Wk).x + q.bk, and the q.bk term is the same for every
        image token, so softmax drops it; P v_proj(x) = (P x) Wv^T + bv since P's rows sum to 1.
        """
        n, k, _ = queries.shape
        q = self._spread(attn.q_proj(queries))  # [N,heads*K,D]
        scores = ((q @ attn.k_proj.weight) @ image_pe.transpose(1, 2)) / math.sqrt(
            attn.internal_dim // attn.num_heads)
        out = attn.v_proj(torch.softmax(scores, dim=-1) @ image)  # [N,heads*K,D]
        out = (out.reshape(n, attn.num_heads, k, -1) * self.head_mask[None, :, None, :]).sum(1)
        return attn.out_proj(out)

    def _image_to_tokens(self, attn: nn.Module, image_pe: torch.Tensor, queries_pe: torch.Tensor,
                         queries: torch.Tensor) -> torch.Tensor:
        """SAM Attention(q=image_pe, k=queries_pe, v=queries): [N,HW,C] over few tokens [N,K,C].

        The query and output projections are moved to the token side: (x Wq^T + bq).k =
        x.(Wq^T k) + bq.k per token k, and out_proj(P v) = P (v Wo^T + bo / heads).
        """
        n, hw, _ = image_pe.shape
        k = self._spread(attn.k_proj(queries_pe))  # [N,heads*K,D]
        v = self._spread(attn.v_proj(queries))
        scores = image_pe @ (k @ attn.q_proj.weight).transpose(1, 2) + (k @ attn.q_proj.bias).unsqueeze(1)
        scores = scores / math.sqrt(attn.internal_dim // attn.num_heads)  # [N,HW,heads*K]
        probs = torch.softmax(scores.reshape(n, hw, attn.num_heads, -1), dim=-1).reshape(n, hw, -1)
        # Each head's probabilities sum to 1, so a row of `probs` sums to `heads`: the output
        # bias rides along in the [heads*K, C] matrix instead of a pass over [N,HW,C].
        return probs @ (v @ attn.out_proj.weight.t() + attn.out_proj.bias / attn.num_heads)

    def _block(self, block: nn.Module, queries: torch.Tensor, tokens: torch.Tensor,
               keys: torch.Tensor, image_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TwoWayAttentionBlock.forward (queries, keys; query_pe=tokens, key_pe=image_pe)."""
        if block.skip_first_layer_pe:
            queries = block.norm1(block.self_attn(q=queries, k=queries, v=queries))
        else:
            q = queries + tokens
            queries = block.norm1(queries + block.self_attn(q=q, k=q, v=queries))
        keys_pe = keys + image_pe
        attn_out = self._tokens_to_image(block.cross_attn_token_to_image, queries + tokens, keys_pe, keys)
        queries = block.norm2(queries + attn_out)
        queries = block.norm3(queries + block.mlp(queries))
        attn_out = self._image_to_tokens(block.cross_attn_image_to_token, keys_pe, queries + tokens,
                                         queries)
        return queries, block.norm4(keys + attn_out)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, box_image: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries [N,K,C], keys [N,HW,C]) as TwoWayTransformer(image[box_image], pe, tokens).

        image [T,HW,C] (embedding + dense prompt, token-major), image_pe [1,HW,C], box_image [N]
        picks each box's image, tokens [N,K,C] are the output + sparse prompt tokens (and their
        positional encoding).
        """
        return self.run_keys(torch.index_select(image, 0, box_image), image_pe, tokens)

    def run_keys(self, keys: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer on each box's own image tokens: keys [N,P,C], image_pe [1 or N,P,C]
        (P = all HW tokens, or a window of them)."""
        queries = tokens
        for block in self.transformer.layers:
            queries, keys = self._block(block, queries, tokens, keys, image_pe)
        attn_out = self._tokens_to_image(self.transformer.final_attn_token_to_image, queries + tokens,
                                         keys + image_pe, keys)
        return self.transformer.norm_final_attn(queries + attn_out), keys


def _gelu(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nn.GELU (erf form), written as x*(1+erf(x/sqrt 2))*0.5: the op order ONNX Runtime fuses
    into one Gelu/BiasGelu kernel (the exporter's own order for F.gelu is not recognised)."""
    if not isinstance(act, nn.GELU) or act.approximate != "none":
        return act(x)
    return x * (1.0 + torch.erf(x / math.sqrt(2.0))) * 0.5


def _subpixel_linear(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-2 stride-2 ConvTranspose2d per token: [..., Cin] -> [..., 4 (dy,dx), Cout]."""
    if tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2) or conv.groups != 1:
        raise ValueError("token-space upscaling needs kernel 2, stride 2 transposed convolutions")
    cin, cout = conv.weight.shape[0], conv.weight.shape[1]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)  # [Cin, (dy,dx,Cout)]
    y = (x @ weight).reshape(*x.shape[:-1], 4, cout)
    return y + conv.bias if conv.bias is not None else y


def upscale_masks(upscaling: nn.Sequential, keys: torch.Tensor, hyper: torch.Tensor,
                  h: int, w: int) -> torch.Tensor:
    """Mask logits [N,1,4h,4w] = hyper . output_upscaling(keys as [N,C,h,w]), in token space.

    keys [N,h*w,C]; hyper [N,C/8] is the hypernetwork output of the one mask token read.
    """
    conv1, norm, act1, conv2, act2 = upscaling
    n = keys.shape[0]
    y = _subpixel_linear(conv1, keys)  # [N,HW,4,C/4]
    y = _gelu(act1, F.layer_norm(y, y.shape[-1:], norm.weight, norm.bias, norm.eps))
    y = _gelu(act2, _subpixel_linear(conv2, y))  # [N,HW,4,4,C/8]
    logits = (y.reshape(n, -1, y.shape[-1]) @ hyper.unsqueeze(-1))  # [N,HW*16,1]
    # token (i,j), first sub-pixel (a1,b1), second (a2,b2) -> pixel (4i+2a1+a2, 4j+2b1+b2);
    # boxes and rows share one axis so that the transpose stays 6-D (GPU runtimes cap the rank)
    logits = logits.reshape(n * h, w, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5)
    return logits.reshape(n, 1, 4 * h, 4 * w)
