"""Tiny CellSAM model directories whose random weights find cells (for parity and tiling tests).

The conftest fixtures' random weights keep no mask at all (their IoU head predicts ~0, below the
0.5 filter), and their CellFinder gives all queries the same score to within 1e-7, so the order
of the prompts (which decides label numbers and which mask wins an overlap) is float noise. Tests
on them alone would be vacuous. `shaped_model_dir` takes such a fixture model and re-shapes two
parts, then re-exports them: CellFinder's decoder cross-attention and position MLP are scaled up
so each query looks at its own anchor's neighbourhood (scores spread over ~0.1, neighbours
>= 1e-5 apart), and SAM's mask decoder gets mask tokens near zero (so masks follow the box),
larger hypernetwork/upscaling weights (so logits cross the threshold) and a spread-out IoU head
(so the 0.5 filter keeps most masks, not all).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np


def blob_image(h=200, w=240, n=25, seed=1, channels=1):
    """Bright Gaussian blobs on a dim noisy background (two channels: nuclear, whole-cell)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w), np.float32)
    for _ in range(n):
        cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(5, 14)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) * rng.uniform(0.5, 1.0)
    img = img * 1000 + rng.normal(0, 5, (h, w)) + 20
    if channels == 2:
        img = np.stack([img, np.roll(img, 5, axis=1) * 0.5 + 10], -1)
    return img.astype(np.float32)


#: ten user boxes (xyxy pixels) inside a 200x240 blob_image
USER_BOXES = np.array([[10, 10, 60, 60], [100, 50, 150, 120], [30, 120, 90, 190],
                       [150, 150, 230, 195], [60, 60, 110, 100], [170, 20, 230, 80],
                       [5, 150, 60, 198], [120, 10, 170, 45], [190, 90, 239, 140],
                       [80, 140, 130, 185]], np.float32)


def fixture_checkpoint(model_dir: Path, tmp: Path, with_model_cp: bool) -> Path:
    """Re-create the checkpoint a conftest fixture dir was exported from, and prove it is that one."""
    from cellsam_export.checkpoint import sha256_file
    from cellsam_export.testing import make_random_checkpoint

    ckpt = make_random_checkpoint(tmp / "fixture.pt", config="tiny", with_model_cp=with_model_cp,
                                  seed=0)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == sha256_file(ckpt)
    return ckpt


def shape_weights(sd: dict) -> None:
    """Make random weights detect distinct boxes and decode box-dependent masks that pass."""
    for key in sd:
        if re.search(r"decoder_layers\.\d+\.cross_attn\.in_proj_weight$", key):
            sd[key] *= 30.0  # sharp attention around each query's anchor
        elif re.search(r"decoder_layers\.\d+\.cross_attn\.out_proj\.weight$", key):
            sd[key] *= 3.0
        elif re.search(r"class_embed\.\d+\.weight$", key):
            sd[key] *= 3.0
        elif re.search(r"adapt_pos1d\.\d\.weight$", key):
            sd[key] *= 10.0  # row/column position embeddings comparable to the features
    for pre in ("model.", "model_cp."):
        md = pre + "mask_decoder."
        if md + "mask_tokens.weight" not in sd:
            continue
        # Near-zero output tokens: after the first (residual-free) self-attention the mask token
        # is what the box prompt put there, so each box gets its own mask.
        sd[md + "mask_tokens.weight"] *= 1e-3
        sd[md + "iou_token.weight"] *= 1e-3
        for layer, gain in ((0, 10.0), (1, 10.0), (2, 10.0)):
            sd[md + f"output_hypernetworks_mlps.0.layers.{layer}.weight"] *= gain
        sd[md + "output_upscaling.3.weight"] *= 10.0
        # Predicted IoU spread over ~0.45..1.0: most masks pass the 0.5 filter, not all.
        sd[md + "iou_prediction_head.layers.2.weight"] *= 300.0
        sd[md + "iou_prediction_head.layers.2.bias"][:] = 0.55


_CACHE: dict = {}


def shaped_model_dir(fixture_dir: Path, tmp: Path, with_model_cp: bool) -> tuple[Path, Path]:
    """The fixture model with re-shaped CellFinder and decoder: (model dir, its checkpoint).

    Built once per test session and fixture dir (the two graph exports take ~30 s).
    """
    key = (str(fixture_dir), with_model_cp)
    if key in _CACHE:
        return _CACHE[key]
    from cellsam_export.checkpoint import (load_checkpoint, random_state_dict, save_checkpoint,
                                           sha256_file)
    from cellsam_export.onnx_export import export_cellfinder, export_decoder

    fixture_checkpoint(fixture_dir, tmp, with_model_cp)
    sd = random_state_dict("tiny", with_model_cp=with_model_cp, seed=0)
    shape_weights(sd)
    ckpt = save_checkpoint(tmp / "shaped.pt", sd, "tiny")
    model, _ = load_checkpoint(ckpt)
    out = tmp / "model"
    shutil.copytree(fixture_dir, out)
    # The encoder weights are the fixture's (same seed, untouched): only the CellFinder and
    # decoder graphs change, CellFinder's CPU variant (what the CPU backend runs) included
    # where the fixture has one.
    # FP16 graphs would be stale, so the manifest lists FP32 only.
    manifest = json.loads((out / "manifest.json").read_text())
    export_cellfinder(model, out / "cellfinder.onnx")
    if "cellfinder" in manifest.get("cpu_graphs", {}).get("fp32", {}):
        export_cellfinder(model, out / "cellfinder.cpu.onnx", fused_attention=True)
    export_decoder(model, out / "decoder.onnx")
    manifest["graphs"] = {"fp32": manifest["graphs"]["fp32"]}
    manifest["source"].update(checkpoint=ckpt.name, sha256=sha256_file(ckpt))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _CACHE[key] = (out, ckpt)
    return out, ckpt
