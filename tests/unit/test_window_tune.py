"""Decoder fine-tuning for windowed decoding: window losses and the frozen trunks."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from cellsam_export.build import build_cellsam  # noqa: E402
from cellsam_export.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from cellsam_export.onnx_export import DecoderGraph, WindowDecoderGraph  # noqa: E402
from cellsam_train.synth import generate  # noqa: E402
from cellsam_train.train import Batch, make_example  # noqa: E402
from cellsam_train.window_tune import tune, window_losses  # noqa: E402

from test_train import TINY_POINT  # noqa: E402

# Patch 8 on a 128 frame: a 16 x 16 token grid, so an 8-token window is a quarter of it.
TINY_P8 = dataclasses.replace(TINY_POINT, patch_size=8)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_cellsam(TINY_P8).eval()
    examples = [make_example(*_sample(seed), 128, mask_block=2) for seed in (3, 4)]
    batch = Batch(examples)
    with torch.no_grad():
        emb = model.model.image_encoder(batch.encoder_in)
    return model, batch, emb


def _sample(seed):
    s = generate(seed, kind="nuclei", model_size=128)
    return s.image, s.labels


def _losses(model, batch, emb, policy, full_share, teacher=None, truth_weight=1.0):
    sam = model.model
    return window_losses(WindowDecoderGraph(sam), DecoderGraph(sam), emb, batch.boxes,
                         batch.masks, policy, torch.Generator().manual_seed(1), 8, full_share, 0.1,
                         teacher=teacher, distill=1.0 if teacher is not None else 0.0,
                         truth_weight=truth_weight)


def _teacher(seed):
    torch.manual_seed(seed)
    sam = build_cellsam(TINY_P8).eval().model
    return DecoderGraph(sam).requires_grad_(False)


def test_a_window_over_the_whole_grid_is_the_full_frame_decoder(setup):
    model, batch, emb = setup
    whole = _losses(model, batch, emb, {"min": 16, "max": 16, "box_factor": 4}, 0.0)
    full = _losses(model, batch, emb, {"min": 16, "max": 16, "box_factor": 4}, 1.0)
    assert float(whole["boxes"]) == float(full["boxes"]) > 0
    for k in ("bce", "dice", "iou"):
        assert float(whole[k].detach()) == pytest.approx(float(full[k].detach()), rel=1e-4, abs=1e-6)


def test_small_windows_train_against_the_truth_under_them(setup):
    model, batch, emb = setup
    policy = {"min": 8, "max": 16, "box_factor": 1}
    sam = model.model
    params = list(sam.mask_decoder.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    first = None
    for _ in range(15):
        terms = _losses(model, batch, emb, policy, 0.0)
        first = float(terms["loss"].detach()) if first is None else first
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    # Windows are 8 of the 16 tokens: wrongly placed truth crops could not be fitted.
    assert float(_losses(model, batch, emb, policy, 0.0)["loss"].detach()) < 0.7 * first


def test_tune_changes_only_the_mask_decoder_and_resumes(tmp_path):
    torch.manual_seed(0)
    init = save_checkpoint(tmp_path / "init.pt", build_cellsam(TINY_P8).state_dict(), TINY_P8)
    model, _ = tune(init, tmp_path / "run", steps=2, batch_size=1, boxes_per_image=4,
                    workers=0, synth_version=3, log=lambda m: None, save_every=1)
    before = load_checkpoint(init)[0].state_dict()
    after = model.state_dict()
    changed = {k.split(".")[1] if k.startswith("model.") else k.split(".")[0]
               for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"mask_decoder"}
    # A second call with more steps resumes from the saved state rather than starting over.
    logs = []
    tune(init, tmp_path / "run", steps=3, batch_size=1, boxes_per_image=4, workers=0,
         synth_version=3, log=logs.append)
    assert any("resumed" in m and "step 2" in m for m in logs)
    assert np.isfinite([float(v) for v in after["model.mask_decoder.iou_token.weight"].flatten()]).all()


def test_a_student_that_is_its_teacher_matches_it_on_the_whole_grid(setup):
    model, batch, emb = setup
    teacher = copy.deepcopy(DecoderGraph(model.model)).requires_grad_(False)
    terms = _losses(model, batch, emb, {"min": 16, "max": 16, "box_factor": 4}, 0.0, teacher)
    assert float(terms["kd_iou"].detach()) == pytest.approx(0.0, abs=1e-10)
    # soft cross-entropy at its floor: the gradient of kd_bce vanishes at student == teacher
    grads = torch.autograd.grad(terms["kd_bce"], list(model.model.mask_decoder.parameters()),
                                allow_unused=True)
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-6


def test_small_windows_learn_the_teachers_masks_under_them(setup):
    model, batch, emb = setup
    policy = {"min": 8, "max": 16, "box_factor": 1}
    teacher = _teacher(7)  # another decoder: the student starts far from it
    params = list(model.model.mask_decoder.parameters())
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=3e-3)

    def kd(t):
        return t["kd_bce"] + t["kd_dice"] + t["kd_iou"]

    first = None
    try:
        for _ in range(15):
            terms = _losses(model, batch, emb, policy, 0.0, teacher, truth_weight=0.0)
            first = float(kd(terms).detach()) if first is None else first
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
        # Windows are 8 of the 16 tokens: teacher masks cropped at the wrong place could not be fitted.
        assert float(kd(_losses(model, batch, emb, policy, 0.0, teacher)).detach()) < 0.7 * first
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
