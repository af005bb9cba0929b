"""Model sizes and construction: the one place that knows how big each CellSAM part is."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import nn

from .modeling.anchor_detr import AnchorDETR, AnchorDETRTransformer, ViTTrunk
from .modeling.cellfinder import CellFinder
from .modeling.cellsam import CellSAM
from .modeling.sam import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer


@dataclass(frozen=True)
class CellSAMConfig:
    """Every size of a CellSAM model (defaults: the official v1.2 model)."""

    image_size: int = 1024
    patch_size: int = 16
    # SAM image encoder (ViT with neck)
    sam_width: int = 768
    sam_depth: int = 12
    sam_heads: int = 12
    sam_window: int = 14
    sam_global_attn: tuple[int, ...] = (2, 5, 8, 11)
    # SAM prompt encoder + mask decoder
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_hidden: int = 256
    mask_in_chans: int = 16
    # CellFinder trunk (ViT without neck)
    finder_width: int = 768
    finder_depth: int = 12
    finder_heads: int = 12
    finder_window: int = 14
    finder_global_attn: tuple[int, ...] = (2, 5, 8, 11)
    # Anchor-DETR head
    detr_hidden: int = 256
    detr_heads: int = 8
    detr_enc_layers: int = 6
    detr_dec_layers: int = 6
    detr_ffn: int = 1024
    num_queries: int = 3500
    num_patterns: int = 1
    num_classes: int = 2
    # Which detector fills `cellfinder`: "anchor_detr" (CellSAM's) or "point" (PointDetector).
    detector: str = "anchor_detr"
    point_detector: dict = field(default_factory=dict)

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (S / patch)."""
        return self.image_size // self.patch_size

    @property
    def mask_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4 x embedding grid)."""
        return 4 * self.embedding_size

    @property
    def total_queries(self) -> int:
        """Box queries per image (patterns x anchor points)."""
        return self.num_patterns * self.num_queries


_TINY_TRUNKS = dict(
    image_size=256,
    sam_width=64, sam_depth=2, sam_heads=2, sam_window=4, sam_global_attn=(1,),
    prompt_dim=64, decoder_mlp_dim=128, iou_head_hidden=64,
    finder_width=64, finder_depth=2, finder_heads=2, finder_window=4, finder_global_attn=(1,),
)

CONFIGS: dict[str, CellSAMConfig] = {
    # CellSAM v1.2 exactly (docs/design.md §1, checkpoint key listing).
    "full": CellSAMConfig(),
    # Test-sized: 256 px input, 16x16 embeddings, 64x64 masks, narrow ViTs, small head.
    "tiny": CellSAMConfig(**_TINY_TRUNKS, detr_hidden=64, detr_heads=4, detr_enc_layers=2,
                          detr_dec_layers=2, detr_ffn=128, num_queries=50),
    # Tiny trunks but the full Anchor-DETR head (3500 queries, 256 wide, 6+6 layers).
    "full_head": CellSAMConfig(**_TINY_TRUNKS),
}


def config_to_dict(config: CellSAMConfig) -> dict[str, Any]:
    """Plain JSON/pickle-safe dict of a config (stored in our checkpoints and manifests)."""
    d = dataclasses.asdict(config)
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = list(v)
    return d


def config_from_dict(d: dict[str, Any]) -> CellSAMConfig:
    """Config from a dict written by `config_to_dict`; unknown keys are an error, missing ones default."""
    names = {f.name: f for f in dataclasses.fields(CellSAMConfig)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown CellSAMConfig fields: {unknown}")
    kwargs = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return CellSAMConfig(**kwargs)


def resolve_config(config: CellSAMConfig | str | dict) -> CellSAMConfig:
    """Accept a config object, a name in CONFIGS, or a dict from `config_to_dict`."""
    if isinstance(config, CellSAMConfig):
        return config
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown config {config!r}; known: {sorted(CONFIGS)}")
        return CONFIGS[config]
    if isinstance(config, dict):
        return config_from_dict(config)
    raise TypeError(f"config must be a CellSAMConfig, name or dict, not {type(config).__name__}")


def config_name(config: CellSAMConfig) -> str | None:
    """Name of the CONFIGS entry equal to `config`, or None for a custom config."""
    for name, c in CONFIGS.items():
        if c == config:
            return name
    return None


def build_sam(config: CellSAMConfig) -> Sam:
    """segment-anything's Sam at the config's sizes (vit_b layout for "full")."""
    c = config
    emb = c.embedding_size
    encoder = ImageEncoderViT(
        img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.sam_width, depth=c.sam_depth,
        num_heads=c.sam_heads, mlp_ratio=4.0, out_chans=c.prompt_dim, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        window_size=c.sam_window, global_attn_indexes=tuple(c.sam_global_attn))
    prompt_encoder = PromptEncoder(
        embed_dim=c.prompt_dim, image_embedding_size=(emb, emb),
        input_image_size=(c.image_size, c.image_size), mask_in_chans=c.mask_in_chans)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=c.num_multimask_outputs,
        transformer=TwoWayTransformer(depth=c.decoder_depth, embedding_dim=c.prompt_dim,
                                      mlp_dim=c.decoder_mlp_dim, num_heads=c.decoder_heads),
        transformer_dim=c.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=c.iou_head_hidden)
    # pixel_mean/pixel_std stay Sam's non-persistent buffers (they are not in the checkpoint).
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def build_cellfinder(config: CellSAMConfig) -> CellFinder:
    """CellFinder (ViT trunk + Anchor-DETR) at the config's sizes."""
    c = config
    trunk = ViTTrunk(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.finder_width,
                     depth=c.finder_depth, num_heads=c.finder_heads, window_size=c.finder_window,
                     global_attn_indexes=c.finder_global_attn)
    transformer = AnchorDETRTransformer(
        d_model=c.detr_hidden, nhead=c.detr_heads, num_encoder_layers=c.detr_enc_layers,
        num_decoder_layers=c.detr_dec_layers, dim_feedforward=c.detr_ffn,
        num_queries=c.num_queries, num_patterns=c.num_patterns, num_classes=c.num_classes)
    return CellFinder(AnchorDETR(trunk, transformer))


def build_cellsam(config: CellSAMConfig | str | dict = "full", with_model_cp: bool = False) -> CellSAM:
    """A randomly initialised CellSAM in eval mode, ready for `load_state_dict`."""
    cfg = resolve_config(config)
    if cfg.detector == "anchor_detr":
        cellfinder: nn.Module = build_cellfinder(cfg)
    elif cfg.detector == "point":
        from .modeling.point_detector import PointDetector
        cellfinder = PointDetector(cfg)
    else:
        raise ValueError(f"unknown detector {cfg.detector!r} (expected 'anchor_detr' or 'point')")
    model_cp = build_sam(cfg) if with_model_cp else None
    model = CellSAM(build_sam(cfg), cellfinder, model_cp=model_cp, config=cfg)
    return model.eval()


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module (for reports and size checks)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["CellSAMConfig", "CONFIGS", "config_to_dict", "config_from_dict", "resolve_config",
           "config_name", "build_sam", "build_cellfinder", "build_cellsam", "count_parameters"]
