"""ONNX export of CellSAM's three inference graphs and the model directory the runtime reads.

The graphs follow docs/design.md §4 and docs/formats.md:

- encoder:    image [B,3,S,S] -> embeddings [B,C,S/16,S/16]
- cellfinder: image [B,3,S,S] -> class_logits [B,Q,2], boxes [B,Q,4] (cxcywh in 0..1)
- decoder:    embeddings [T,C,h,w], boxes [N,4] (xyxy, S-space), box_image [N] int64
              -> mask_logits [N,1,4h,4w], iou [N,1]

Preprocessing, top-k, thresholds and mask upsampling stay outside the graphs.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .modeling.box_decoder import TwoWayPerBox, upscale_masks

__all__ = [
    "EncoderGraph",
    "CellFinderGraph",
    "DecoderGraph",
    "export_encoder",
    "export_cellfinder",
    "export_decoder",
    "export_model_dir",
    "ExportError",
    "GRAPH_NAMES",
    "DEFAULT_THRESHOLDS",
]

GRAPH_NAMES = ("encoder", "cellfinder", "decoder")
DEFAULT_THRESHOLDS = {"bbox_threshold": 0.4, "iou_threshold": 0.5, "mask_threshold": 0.4, "min_size": 25}
MANIFEST_FORMAT_VERSION = 1


class ExportError(RuntimeError):
    """Raised when a model directory cannot be written (e.g. it exists and force is off)."""


# --------------------------------------------------------------------------------------------
# Graph wrappers
# --------------------------------------------------------------------------------------------


class EncoderGraph(nn.Module):
    """SAM image encoder (ViT + neck) on an already-normalised image; preprocessing stays outside."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Map image [B,3,S,S] to embeddings [B,C,S/16,S/16]."""
        return self.image_encoder(image)


class CellFinderGraph(nn.Module):
    """CellFinder detector: raw class logits and normalised cxcywh boxes for every query."""

    def __init__(self, cellfinder: nn.Module) -> None:
        super().__init__()
        self.cellfinder = cellfinder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map image [B,3,S,S] to (class_logits [B,Q,2], boxes [B,Q,4])."""
        class_logits, boxes = self.cellfinder(image)
        return class_logits, boxes


class DecoderGraph(nn.Module):
    """SAM prompt encoder (boxes only) + mask decoder, single-mask output, many boxes per call.

    Each box picks its image embedding with `index_select(box_image)` instead of SAM's
    `repeat_interleave` (which exports to OneHot+Tile, rejected by TensorRT), so one call serves
    boxes from many images/tiles. The arithmetic is that of `PromptEncoder._embed_boxes` and
    `MaskDecoder.predict_masks` with `multimask_output=False`, evaluated in an order that suits
    7 box tokens against 4096 image tokens (modeling/box_decoder.py).
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        pe = sam.prompt_encoder
        md = sam.mask_decoder
        self.pe_layer = pe.pe_layer
        self.transformer = TwoWayPerBox(md.transformer)
        self.output_upscaling = md.output_upscaling
        # Only mask token 0 is read with multimask_output=False; the other tokens still take part
        # in attention, so all of them enter the transformer.
        self.hypernetwork_mlp = md.output_hypernetworks_mlps[0]
        self.iou_prediction_head = md.iou_prediction_head
        self.iou_token = md.iou_token
        self.mask_tokens = md.mask_tokens
        self.corner_embeddings = nn.ModuleList([pe.point_embeddings[2], pe.point_embeddings[3]])
        self.no_mask_embed = pe.no_mask_embed
        self.input_image_size = tuple(int(v) for v in pe.input_image_size)
        self.embedding_size = tuple(int(v) for v in pe.image_embedding_size)
        # get_dense_pe depends only on weights, so it is computed once and stored as a constant.
        with torch.no_grad():
            self.register_buffer("image_pe", pe.get_dense_pe().detach().clone(), persistent=False)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Sparse prompt embeddings [N,2,C] of xyxy boxes, exactly as PromptEncoder._embed_boxes."""
        coords = (boxes + 0.5).reshape(-1, 2, 2)  # shift to pixel centre, as SAM does
        img_h, img_w = self.input_image_size
        x = coords[:, :, 0:1] / img_w
        y = coords[:, :, 1:2] / img_h
        corner = self.pe_layer._pe_encoding(torch.cat([x, y], dim=-1).to(torch.float32))
        corners = torch.cat([self.corner_embeddings[0].weight, self.corner_embeddings[1].weight], dim=0)
        return corner + corners.unsqueeze(0)

    def forward(
        self, embeddings: torch.Tensor, boxes: torch.Tensor, box_image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map (embeddings [T,C,h,w], boxes [N,4], box_image [N]) to (mask_logits [N,1,4h,4w], iou [N,1])."""
        n = boxes.shape[0]
        sparse = self.embed_boxes(boxes)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)

        c, h, w = embeddings.shape[1], embeddings.shape[2], embeddings.shape[3]
        # Token-major per image; the dense prompt (no mask) is the same for every box.
        image = embeddings.flatten(2).transpose(1, 2) + self.no_mask_embed.weight.reshape(1, 1, c)
        image_pe = self.image_pe.flatten(2).transpose(1, 2)
        hs, keys = self.transformer(image, image_pe, box_image, tokens)
        iou_token_out = hs[:, 0, :]
        mask_token_out = hs[:, 1, :]
        mask_logits = upscale_masks(self.output_upscaling, keys, self.hypernetwork_mlp(mask_token_out),
                                    h, w)
        iou = self.iou_prediction_head(iou_token_out)[:, 0:1]
        return mask_logits, iou


class WindowDecoderGraph(DecoderGraph):
    """The mask decoder on a window of the image embedding around each box (RoI-style).

    Each box reads only a W x W window of embedding tokens starting at its `origin` (token row,
    col), with their own positional encoding, and returns the window's mask logits
    [N,1,4W,4W]. W is dynamic: `cells` [W,W] holds the flat token offsets i*w + j of the window
    cells (the runtime passes them, so one graph serves every window size). The box prompt keeps
    its absolute coordinates. Every per-token cost of the decoder shrinks by HW / W^2; the
    tokens' attention is restricted to the window, so this approximates `DecoderGraph`, closely
    where the window is a few times the box (the runtime picks the window of each box).
    """

    def forward(self, embeddings: torch.Tensor, boxes: torch.Tensor, box_image: torch.Tensor,
                origin: torch.Tensor, cells: torch.Tensor, paste: Optional[torch.Tensor] = None,
                paste_cells: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [T,C,h,w], boxes [N,4], box_image [N], origin [N,2], cells [W,W]) ->
        (mask_logits [N,1,4W,4W], iou [N,1]).

        With `paste` [N,2] and `paste_cells` [V,V] (flat offsets i*W + j inside the window) only a
        V x V block of the window, starting at token `paste`, is upscaled: mask_logits
        [N,1,4V,4V]. Each token's output pixels depend on that token alone (box_decoder.py), so
        the block equals that part of the whole window's logits; the runtime asks for the block
        around the box, where the mask is.
        """
        n = boxes.shape[0]
        sparse = self.embed_boxes(boxes)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)

        c, h, w = embeddings.shape[1], embeddings.shape[2], embeddings.shape[3]
        win = cells.shape[0]
        start = origin[:, 0:1] * w + origin[:, 1:2]                      # [N,1]
        flat = start + cells.reshape(1, -1)                              # [N,P]
        image = embeddings.flatten(2).transpose(1, 2).reshape(-1, c)     # [T*HW,C]
        rows = (box_image.unsqueeze(1) * (h * w) + flat).reshape(-1)
        keys = torch.index_select(image, 0, rows).reshape(n, -1, c)
        keys = keys + self.no_mask_embed.weight.reshape(1, 1, c)
        pe = torch.index_select(self.image_pe.flatten(2).transpose(1, 2)[0], 0,
                                flat.reshape(-1)).reshape(n, -1, c)
        hs, keys = self.transformer.run_keys(keys, pe, tokens)
        side = win
        if paste is not None:
            side = paste_cells.shape[0]
            pick = (paste[:, 0:1] * win + paste[:, 1:2]) + paste_cells.reshape(1, -1)  # [N,V*V]
            rows = (torch.arange(n, dtype=torch.int64).unsqueeze(1) * (win * win) + pick).reshape(-1)
            keys = torch.index_select(keys.reshape(-1, c), 0, rows).reshape(n, -1, c)
        mask_logits = upscale_masks(self.output_upscaling, keys,
                                    self.hypernetwork_mlp(hs[:, 1, :]), side, side)
        iou = self.iou_prediction_head(hs[:, 0, :])[:, 0:1]
        return mask_logits, iou


# --------------------------------------------------------------------------------------------
# Export of single graphs
# --------------------------------------------------------------------------------------------


def _image_size(sam: nn.Module) -> int:
    """Square input size S of a SAM's image encoder."""
    return int(sam.image_encoder.img_size)


def _sam_of(model: nn.Module) -> nn.Module:
    """The SAM to export: a CellSAM's inference SAM (model_cp if present), or a bare Sam."""
    return model.sam if hasattr(model, "cellfinder") else model


def _detector_input_size(detector: nn.Module) -> Optional[int]:
    """Input size S of a bare detector, from an `image_size` attribute or its ViT patch grid."""
    size = getattr(detector, "image_size", None)
    if size is not None:
        return int(size)
    for module in detector.modules():
        pos, patch = getattr(module, "pos_embed", None), getattr(module, "patch_embed", None)
        if isinstance(pos, torch.Tensor) and patch is not None and hasattr(patch, "proj"):
            return int(pos.shape[1]) * int(patch.proj.stride[0])
    return None


def _onnx_export(
    module: nn.Module,
    args: tuple,
    path: Union[str, Path],
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict,
    opset: int,
    fold_limit: Optional[int] = None,
    fused_attention: bool = False,
    relpos_kernel: bool = True,
) -> Path:
    """Export `module` with the dynamo exporter into one self-contained .onnx file.

    `fold_limit` (elements) raises the exporter's constant-folding size limits, so that
    input-independent subgraphs over whole weight matrices are precomputed too.
    `fused_attention` routes attention (and the ViT MLPs' bias + GELU) through ONNX Runtime contrib
    ops (ort_fusions.py): a graph for ONNX Runtime only; with `relpos_kernel` its global attention
    is cellsam-rt's own com.cellsam.RelPosAttention (needs cellsam_rt.kernels at run time).
    """
    import onnx

    from .ort_fusions import fused_attention as fuse, translation_table

    path = Path(path)
    module = module.eval()
    extra = {"custom_translation_table": translation_table()} if fused_attention else {}
    with torch.no_grad(), (fuse(module, relpos_kernel) if fused_attention
                             else contextlib.nullcontext()) as n:
        if fused_attention and not n:
            raise ExportError(f"{path.name}: no attention to fuse in this graph")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            external_data=False,
            optimize=True,
            verbose=False,
            **extra,
        )
    model = program.model_proto
    if fold_limit:
        import onnxscript.optimizer

        model = onnxscript.optimizer.optimize(model, input_size_limit=fold_limit, output_size_limit=fold_limit)
    _check_io_names(model, input_names, output_names)
    if model.ByteSize() >= 2**31 - 1:
        raise ExportError(f"{path.name}: graph exceeds the 2 GB protobuf limit")
    # Save ourselves so that the weights are always inside the single file.
    onnx.save_model(model, str(path), save_as_external_data=False)
    return path


def _check_io_names(model, input_names: list[str], output_names: list[str]) -> None:
    """Fail early if the exporter renamed or dropped graph inputs/outputs."""
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != list(input_names) or got_out != list(output_names):
        raise ExportError(f"unexpected graph I/O: inputs {got_in}, outputs {got_out}")


def export_encoder(model: nn.Module, path: Union[str, Path], opset: int = 18,
                   fused_attention: bool = False, relpos_kernel: bool = True) -> Path:
    """Write the image encoder graph `image -> embeddings` (dynamic batch) of a CellSAM or Sam.

    fused_attention=True writes the ONNX Runtime CPU variant (ort_fusions.py), relpos_kernel
    with cellsam-rt's attention kernel in its global blocks.
    """
    sam = _sam_of(model)
    s = _image_size(sam)
    example = (torch.randn(2, 3, s, s),)
    batch = torch.export.Dim("B", min=1, max=1024)
    return _onnx_export(
        EncoderGraph(sam), example, path, ["image"], ["embeddings"], {"image": {0: batch}}, opset,
        fused_attention=fused_attention, relpos_kernel=relpos_kernel,
    )


def export_cellfinder(
    model: nn.Module, path: Union[str, Path], opset: int = 18, image_size: Optional[int] = None,
    fused_attention: bool = False, relpos_kernel: bool = True,
) -> Path:
    """Write the CellFinder graph `image -> class_logits, boxes` (dynamic batch) of a CellSAM or detector.

    fused_attention=True writes the ONNX Runtime CPU variant (ort_fusions.py), relpos_kernel
    with cellsam-rt's attention kernel in its global blocks.
    """
    if hasattr(model, "cellfinder"):
        cellfinder = model.cellfinder
        image_size = image_size or _image_size(model.sam)
    else:
        cellfinder = model
        image_size = image_size or _detector_input_size(cellfinder)
    if not image_size:
        raise ExportError("export_cellfinder: pass image_size for a detector without a ViT trunk")
    example = (torch.randn(2, 3, image_size, image_size),)
    batch = torch.export.Dim("B", min=1, max=1024)
    return _onnx_export(
        CellFinderGraph(cellfinder),
        example,
        path,
        ["image"],
        ["class_logits", "boxes"],
        {"image": {0: batch}},
        opset,
        # Anchor-DETR's query and row/column position embeddings (sine encodings through MLPs
        # over the learned anchors) do not depend on the image: fold them into constants
        # (+~13 MB at full size) instead of recomputing them, in FP16 on CPU, every call.
        fold_limit=1 << 22,
        fused_attention=fused_attention, relpos_kernel=relpos_kernel,
    )


def export_decoder(model: nn.Module, path: Union[str, Path], opset: int = 18) -> Path:
    """Write the box-prompted mask decoder graph (dynamic T images, N boxes) of a CellSAM or Sam."""
    sam = _sam_of(model)
    graph = DecoderGraph(sam)
    c = int(sam.prompt_encoder.embed_dim)
    h, w = graph.embedding_size
    s = _image_size(sam)
    # Sizes >= 2 and distinct from each other and from every static dim, so that the tracer
    # neither specialises them to 0/1 nor unifies T with N.
    t_ex, n_ex = 3, 5
    gen = torch.Generator().manual_seed(0)
    example = (
        torch.randn(t_ex, c, h, w, generator=gen),
        torch.rand(n_ex, 4, generator=gen) * s,
        torch.arange(n_ex, dtype=torch.int64) % t_ex,
    )
    t_dim = torch.export.Dim("T", min=1, max=65536)
    n_dim = torch.export.Dim("N", min=1, max=1 << 20)
    dynamic = {"embeddings": {0: t_dim}, "boxes": {0: n_dim}, "box_image": {0: n_dim}}
    return _onnx_export(
        graph, example, path, ["embeddings", "boxes", "box_image"], ["mask_logits", "iou"], dynamic, opset
    )


#: the windowed decoder's policy for a decoder trained on whole frames (window sides in
#: embedding tokens): 4x the box's longer side, at least 48 of the 64 tokens (smaller windows
#: cost such a decoder accuracy: docs/performance.md), at most the whole grid. A decoder tuned
#: by `cellsam_train.window_tune` is exported with that module's smaller WINDOW_POLICY.
DEFAULT_DECODER_WINDOW = {"min": 48, "max": 64, "box_factor": 4}


def window_cells(window: int, width: int) -> torch.Tensor:
    """The `cells` input of WindowDecoderGraph: flat offsets i*width + j of a window x window."""
    ar = torch.arange(window, dtype=torch.int64)
    return ar[:, None] * width + ar[None, :]


def export_window_decoder(model: nn.Module, path: Union[str, Path], opset: int = 18) -> Path:
    """Write the windowed mask decoder graph (dynamic T images, N boxes, window side W, pasted
    block side V)."""
    sam = _sam_of(model)
    graph = WindowDecoderGraph(sam)
    c = int(sam.prompt_encoder.embed_dim)
    h, w = graph.embedding_size
    s = _image_size(sam)
    t_ex, n_ex, w_ex, v_ex = 3, 5, min(7, h, w), min(5, h, w)  # distinct sizes
    gen = torch.Generator().manual_seed(0)
    example = (
        torch.randn(t_ex, c, h, w, generator=gen),
        torch.rand(n_ex, 4, generator=gen) * s,
        torch.arange(n_ex, dtype=torch.int64) % t_ex,
        torch.randint(0, min(h, w) - w_ex + 1, (n_ex, 2), generator=gen),
        window_cells(w_ex, w),
        torch.randint(0, w_ex - v_ex + 1, (n_ex, 2), generator=gen),
        window_cells(v_ex, w_ex),
    )
    t_dim = torch.export.Dim("T", min=1, max=65536)
    n_dim = torch.export.Dim("N", min=1, max=1 << 20)
    w_dim = torch.export.Dim("W", min=1, max=min(h, w))
    v_dim = torch.export.Dim("V", min=1, max=min(h, w))
    dynamic = {"embeddings": {0: t_dim}, "boxes": {0: n_dim}, "box_image": {0: n_dim},
               "origin": {0: n_dim}, "cells": {0: w_dim, 1: w_dim},
               "paste": {0: n_dim}, "paste_cells": {0: v_dim, 1: v_dim}}
    return _onnx_export(graph, example, path,
                        ["embeddings", "boxes", "box_image", "origin", "cells", "paste",
                         "paste_cells"],
                        ["mask_logits", "iou"], dynamic, opset)


# --------------------------------------------------------------------------------------------
# Model directory
# --------------------------------------------------------------------------------------------


def _exporter_versions() -> dict:
    """Versions of the packages that produced the graphs, for the manifest."""
    import onnx

    from cellsam_export import __version__

    versions = {"package": "cellsam-rt", "version": __version__, "torch": torch.__version__.split("+")[0],
                "onnx": onnx.__version__}
    try:
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    except ImportError:  # pragma: no cover - onnxscript is required by the dynamo exporter
        pass
    return versions


# The trunks. The mask decoder's attention (box tokens <-> image tokens, head dim 16) is slower
# as MultiHeadAttention than as plain ops (docs/performance.md), so it keeps its plain graph.
CPU_GRAPHS = ("encoder", "cellfinder")


def cpu_graph_file(graph: str) -> str:
    """File name of a graph's ONNX Runtime CPU variant (fused attention, ort_fusions.py)."""
    return f"{graph}.cpu.onnx"


def export_cpu_graph(model: nn.Module, graph: str, path: Union[str, Path], opset: int = 18,
                     relpos_kernel: bool = True) -> Path:
    """Write the fused-attention CPU variant of `graph` ("encoder" or "cellfinder") of a CellSAM;
    `relpos_kernel`: global attention as com.cellsam.RelPosAttention (ort_fusions.py)."""
    if graph not in CPU_GRAPHS:
        raise ExportError(f"no CPU variant for graph {graph!r} (only {', '.join(CPU_GRAPHS)})")
    export = export_encoder if graph == "encoder" else export_cellfinder
    return export(model, path, opset, fused_attention=True, relpos_kernel=relpos_kernel)


def build_manifest(model, info: dict, opset: int, fp16: bool, name: Optional[str] = None,
                   cpu_graphs: Sequence[str] = (), cpu_custom_ops: Sequence[str] = (),
                   decoder_window: Optional[dict] = None) -> dict:
    """The manifest.json contents for a loaded CellSAM and its checkpoint info."""
    sam = model.sam
    s = _image_size(sam)
    h, w = (int(v) for v in sam.prompt_encoder.image_embedding_size)
    c = int(sam.prompt_encoder.embed_dim)
    num_queries, num_classes = _detector_shape(model.cellfinder, s)
    config_name = info.get("config_name") or "custom"
    ckpt = info.get("path")
    source = {"checkpoint": Path(ckpt).name if ckpt else None, "sha256": info.get("sha256"),
              "config": config_name}
    if "random_seed" in info:  # random-weight export (tests, demos): no checkpoint file
        source["random_seed"] = int(info["random_seed"])
    names = GRAPH_NAMES + (("decoder_window",) if decoder_window else ())
    graphs = {"fp32": {g: f"{g}.onnx" for g in names}}
    if fp16:
        # The windowed decoder is small and cheap: FP16 runs share its FP32 file.
        graphs["fp16"] = {g: f"{g}.onnx" if g == "decoder_window" else f"{g}.fp16.onnx"
                          for g in names}
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        # Default name: the checkpoint's file stem (cellsam_general, cellsam_extra, ...).
        "name": name or (Path(ckpt).stem if ckpt else f"cellsam-{config_name}-random"),
        "description": f"CellSAM ({config_name} config) exported by cellsam-rt",
        "image_size": s,
        "embedding_shape": [c, h, w],
        "mask_size": 4 * h,
        "num_queries": num_queries,
        "num_classes": num_classes,
        "preprocessing": {"mode": "cellsam", "has_model_cp": bool(model.has_model_cp)},
        "thresholds": dict(DEFAULT_THRESHOLDS),
        "graphs": graphs,
        "opset": int(opset),
        "source": source,
        "exporter": _exporter_versions(),
    }
    if decoder_window:
        manifest["decoder_window"] = dict(decoder_window)
    if cpu_graphs:
        # Same weights, attention as com.microsoft.MultiHeadAttention: ONNX Runtime's CPU
        # provider uses these in place of graphs.fp32 (cellsam_rt.backends.onnxruntime).
        manifest["cpu_graphs"] = {"fp32": {g: cpu_graph_file(g) for g in cpu_graphs}}
    if cpu_custom_ops:
        # Ops of cellsam-rt's own kernel library (cellsam_rt.kernels) that those graphs call.
        manifest["cpu_custom_ops"] = sorted(cpu_custom_ops)
    return manifest


def _detector_shape(cellfinder: nn.Module, image_size: int) -> tuple[int, int]:
    """(queries Q, classes K) of the detector, from its attributes or else a forward pass."""
    q = getattr(cellfinder, "num_queries", None)
    k = getattr(cellfinder, "num_classes", None)
    if k is None:
        head = getattr(getattr(cellfinder, "decode_head", None), "transformer", None)
        class_embed = getattr(head, "class_embed", None)
        if class_embed is not None and len(class_embed) > 0:
            k = class_embed[-1].out_features
    if q is not None and k is not None:
        return int(q), int(k)
    with torch.no_grad():  # a full-size forward is slow on a CPU, hence the attributes first
        logits, _ = cellfinder(torch.zeros(1, 3, image_size, image_size))
    return int(logits.shape[1]), int(logits.shape[2])


def export_model_dir(
    checkpoint: Union[str, Path, tuple],
    out_dir: Union[str, Path],
    fp16: bool = True,
    opset: int = 18,
    force: bool = False,
    progress: Optional[Callable[[str], None]] = print,
    name: Optional[str] = None,
    cpu_graphs: bool = True,
    cpu_kernels: bool = True,
    decoder_window: Optional[dict] = None,
) -> Path:
    """Export a checkpoint into a complete model directory, atomically (all or nothing).

    `cpu_graphs` also writes `encoder.cpu.onnx` and `cellfinder.cpu.onnx`: the FP32 trunks with
    fused attention and bias-GELU for ONNX Runtime's CPU provider (ort_fusions.py);
    `cpu_kernels` puts their global attention on cellsam-rt's own kernel (cellsam_rt.kernels).

    `checkpoint` is a checkpoint file, or an already loaded `(CellSAM, info)` pair as returned
    by `checkpoint.load_checkpoint` (used for random-weight exports without a file).

    `decoder_window` (a policy such as DEFAULT_DECODER_WINDOW) adds the windowed mask decoder
    (WindowDecoderGraph), an approximation the runtime then uses for boxes whose window fits; the
    published CellSAM models are exported without it, so that their labels stay the reference's.
    """
    out_dir = Path(out_dir)
    say = progress or (lambda _msg: None)
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} already exists (use --force to replace it)")
    if isinstance(checkpoint, tuple):
        model, info = checkpoint
    else:
        from cellsam_export.checkpoint import load_checkpoint

        model, info = load_checkpoint(checkpoint)
    model = model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        jobs = [
            ("encoder", lambda p: export_encoder(model, p, opset)),
            ("cellfinder", lambda p: export_cellfinder(model, p, opset)),
            ("decoder", lambda p: export_decoder(model, p, opset)),
        ]
        if decoder_window:
            jobs.append(("decoder_window", lambda p: export_window_decoder(model, p, opset)))
        for graph_name, job in jobs:
            t0 = time.perf_counter()
            say(f"exporting {graph_name} ...")
            path = job(tmp / f"{graph_name}.onnx")
            say(f"exported {graph_name}: {_mb(path)} in {time.perf_counter() - t0:.1f} s")
            if fp16 and graph_name != "decoder_window":
                from cellsam_export.fp16 import convert_to_fp16

                t0 = time.perf_counter()
                dst = tmp / f"{graph_name}.fp16.onnx"
                convert_to_fp16(path, dst)
                say(f"converted {graph_name} to fp16: {_mb(dst)} in {time.perf_counter() - t0:.1f} s")
        written, needed_ops = [], set()
        for graph_name in CPU_GRAPHS if cpu_graphs else ():
            from cellsam_export.ort_fusions import count_attention

            part = model.sam.image_encoder if graph_name == "encoder" else model.cellfinder
            if not count_attention(part):  # e.g. a convolutional detector: nothing to gain
                say(f"{graph_name}: no attention to fuse, no CPU variant")
                continue
            t0 = time.perf_counter()
            say(f"exporting {graph_name} with fused attention (ONNX Runtime CPU) ...")
            dst = export_cpu_graph(model, graph_name, tmp / cpu_graph_file(graph_name), opset,
                                   relpos_kernel=cpu_kernels)
            say(f"exported {dst.name}: {_mb(dst)} in {time.perf_counter() - t0:.1f} s")
            written.append(graph_name)
            needed_ops.update(_custom_ops_of(dst))
        manifest = build_manifest(model, info, opset, fp16, name=name, cpu_graphs=written,
                                  cpu_custom_ops=sorted(needed_ops),
                                  decoder_window=decoder_window)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"model directory written: {out_dir}")
    return out_dir


def _custom_ops_of(path: Path) -> list[str]:
    import onnx

    from .ort_fusions import custom_ops

    return custom_ops(onnx.load(str(path), load_external_data=False))


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory into place; an existing one is removed only at this point."""
    os.chmod(src, 0o755)  # mkdtemp creates 0700; a model directory is meant to be shared
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _mb(path: Path) -> str:
    """A file size in MB for progress messages."""
    return f"{path.stat().st_size / 1e6:.1f} MB"
