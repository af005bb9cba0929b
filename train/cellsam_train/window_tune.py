"""Fine-tune the mask decoder for windowed decoding (the image encoder and detector stay frozen).

    python -m cellsam_train.window_tune --init CKPT --out DIR [--steps N] [--window-min 16]

The runtime decodes each box from a window of the image embedding around it (`decoder_window`
in the manifest: the window side is `box_factor` times the box side, at least `min` tokens). A
decoder trained only on the whole token grid loses accuracy in small windows; this stage trains
it on the windows the runtime will give it, with a share of whole-frame boxes so that the
full-frame graph (`--decoder full`, boxes too large for any window) keeps working. Both graphs
share the decoder's weights.

With `--distill W` the targets include the init decoder itself: a frozen copy decodes the same
boxes on the whole frame and the windowed decoder learns to give its masks and predicted IoU
(soft cross-entropy and Dice on its mask probabilities, MSE on its IoU), weighted W against
the truth losses' `--truth-weight`. Tuning on truth alone moves the decoder where the tuning
data lead it; distillation keeps the masks of the decoder the evaluation was made with.

Only the mask decoder learns, so detections, and with them recall, are those of `--init`; the
encoder runs without gradients on whole frames. Examples are synthetic (and, with
`--real-data`, real) frames of the model's input size; the mask losses are those of the main
training (`train.mask_losses`) on the window's crop of the truth. The result is a checkpoint
and a model directory whose manifest states the window policy trained for.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from cellsam_export.checkpoint import load_checkpoint, save_checkpoint
from cellsam_export.onnx_export import DecoderGraph, WindowDecoderGraph, window_cells
from cellsam_rt.stages.masks import window_origins, window_sides

from .train import (SynthStream, _loader, export_checkpoint, file_logger, jitter_boxes,
                    mask_losses, seed_everything)

__all__ = ["WINDOW_POLICY", "distill_losses", "window_losses", "tune", "main"]

# The policy the tuned decoder is exported with (min 16 tokens: a 25 px nucleus gets a 128 px
# window, 1/16 of the 512 frame's tokens).
WINDOW_POLICY = {"min": 16, "max": 64, "box_factor": 4}


def _sample_policy(base: dict, gen: torch.Generator) -> dict:
    """The runtime's policy with its factor and minimum varied, so nearby windows train too."""
    u = torch.rand(2, generator=gen).tolist()
    factor = base["box_factor"] * (0.75 + 0.5 * u[0])
    low = base["min"] if u[1] < 0.6 else base["min"] + 8 * int(1 + 3 * u[1])
    return {"min": min(low, base["max"]), "max": base["max"], "box_factor": factor}


def distill_losses(mask_logits: torch.Tensor, iou_pred: torch.Tensor,
                   teacher_logits: torch.Tensor, teacher_iou: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(soft BCE, Dice, IoU MSE) of a student's masks [N,1,h,w] and IoU [N,1] against a teacher's
    logits and IoU on the same pixels."""
    target = torch.sigmoid(teacher_logits)
    l_bce = F.binary_cross_entropy_with_logits(mask_logits, target)
    prob, tp = torch.sigmoid(mask_logits).flatten(1), target.flatten(1)
    l_dice = (1 - (2 * (prob * tp).sum(1) + 1) / (prob.sum(1) + tp.sum(1) + 1)).mean()
    return l_bce, l_dice, F.mse_loss(iou_pred, teacher_iou)


def window_losses(window: WindowDecoderGraph, full: DecoderGraph, emb: torch.Tensor,
                  boxes: list[torch.Tensor], masks: list[torch.Tensor], policy: dict,
                  gen: torch.Generator, boxes_per_image: int, full_share: float, jitter: float,
                  teacher: Optional[DecoderGraph] = None, distill: float = 0.0,
                  truth_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Mask losses of one batch: each picked box decoded in its window (or the whole frame).

    emb [B,C,h,w] (no gradient needed); boxes[i] [n,4] xyxy in model px; masks[i] [n,m,m] soft
    truth at the decoder's low-res mask side m = 4h. With a `teacher` (a frozen whole-frame
    decoder) the loss adds `distill` times the distillation terms (`distill_losses`) to
    `truth_weight` times the truth terms.
    """
    size = int(window.input_image_size[0])
    grid = int(emb.shape[-1])
    groups: dict[int, tuple[list, list, list]] = {}
    for i, (b, m) in enumerate(zip(boxes, masks)):
        if len(b) == 0:
            continue
        pick = torch.randperm(len(b), generator=gen)[:boxes_per_image]
        jb, mp = jitter_boxes(b[pick], jitter, gen), m[pick]
        sides = window_sides(jb.detach().cpu().numpy(), size, grid, policy)
        forced = (torch.rand(len(pick), generator=gen) < full_share).numpy()
        sides = np.where(forced, 0, sides)
        for side in np.unique(sides):
            sel = torch.from_numpy(np.flatnonzero(sides == side))
            g = groups.setdefault(int(side), ([], [], []))
            g[0].append(jb[sel])
            g[1].append(mp[sel])
            g[2].append(torch.full((len(sel),), i, dtype=torch.long))
    # per window side: mask logits [n,1,s,s], iou [n,1], truth [n,s,s], teacher's logits and iou
    outputs = []
    for side, (gb, gm, gi) in groups.items():
        bx, truth, img = torch.cat(gb), torch.cat(gm), torch.cat(gi)
        t_lg = t_iou = None
        if teacher is not None:
            with torch.no_grad():
                t_lg, t_iou = teacher(emb, bx, img)
            t_lg = t_lg[:, 0]
        if side == 0:
            lg, iou = full(emb, bx, img)
        else:
            origin = torch.from_numpy(window_origins(bx.detach().numpy(), np.full(len(bx), side),
                                                     size, grid))
            lg, iou = window(emb, bx, img, origin, window_cells(side, grid))
            per = truth.shape[-1] // grid  # mask pixels per token
            cuts = [(slice(oy * per, (oy + side) * per), slice(ox * per, (ox + side) * per))
                    for oy, ox in origin.tolist()]
            truth = torch.stack([truth[k][c] for k, c in enumerate(cuts)])
            if t_lg is not None:
                t_lg = torch.stack([t_lg[k][c] for k, c in enumerate(cuts)])
        outputs.append((lg, iou, truth, t_lg, t_iou))
    # Losses per group (different mask sizes), weighted by their box counts.
    n = sum(len(o[2]) for o in outputs)
    names = ("bce", "dice", "iou") + (("kd_bce", "kd_dice", "kd_iou") if teacher is not None else ())
    terms = {k: 0.0 for k in names}
    for lg, iou, tr, t_lg, t_iou in outputs:
        w = len(tr) / n
        values = mask_losses(lg, iou, tr)
        if teacher is not None:
            values += distill_losses(lg, iou, t_lg.unsqueeze(1), t_iou)
        for k, v in zip(names, values):
            terms[k] = terms[k] + w * v
    terms["loss"] = truth_weight * (terms["bce"] + terms["dice"] + terms["iou"])
    if teacher is not None:
        terms["loss"] = terms["loss"] + distill * (terms["kd_bce"] + terms["kd_dice"] + terms["kd_iou"])
    terms["boxes"] = torch.tensor(float(n))
    return terms


def tune(init: Path, out: Path, steps: int = 2000, lr: float = 1e-4, seed: int = 0,
         batch_size: int = 2, boxes_per_image: int = 32, full_share: float = 0.2,
         jitter: float = 0.1, synth_version: int = 4, real_data: Optional[Path] = None,
         real_fraction: float = 0.35, policy: Optional[dict] = None, workers: int = 1,
         distill: float = 0.0, truth_weight: float = 1.0, log=print, save_every: int = 200):
    """Fine-tune `init`'s mask decoder for windowed decoding -> (model, config).

    `distill` > 0 adds a frozen copy of `init`'s decoder as the teacher (see window_losses)."""
    policy = dict(policy or WINDOW_POLICY)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    model, _ = load_checkpoint(init)
    config = model.config
    sam = model.model
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(sam.mask_decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    sam.mask_decoder.train()
    window, full = WindowDecoderGraph(sam), DecoderGraph(sam)
    teacher = None
    if distill > 0:
        frozen, _ = load_checkpoint(init)
        teacher = DecoderGraph(frozen.model.eval())
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    state_path = out / "tune_state.pt"
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        sam.mask_decoder.load_state_dict(st["decoder"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        start = int(st["step"])
        log(f"resumed from {state_path} at step {start}")
    settings = dict(init=str(init), steps=steps, lr=lr, seed=seed, batch_size=batch_size,
                    boxes_per_image=boxes_per_image, full_share=full_share, jitter=jitter,
                    synth_version=synth_version, real_fraction=real_fraction if real_data else 0.0,
                    policy=policy, distill=distill, truth_weight=truth_weight)
    log(f"settings: {json.dumps(settings)}")
    real = None
    if real_data is not None and real_fraction > 0:
        from .real_data import RealImages

        real = RealImages(real_data)
    mask_block = config.patch_size // 4
    data = _loader(SynthStream(base_seed=seed * 10_000_000 + 7_000_000, image_size=config.image_size,
                               start=start * batch_size, version=synth_version,
                               mask_block=mask_block, real=real,
                               real_fraction=real_fraction if real else 0.0),
                   batch_size, workers)
    encoder = sam.image_encoder.eval()
    t0 = last = time.time()
    history = []
    for step in range(start, steps):
        batch = next(data)
        with torch.no_grad():
            emb = encoder(batch.encoder_in)
        t = step / max(steps - 1, 1)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
        terms = window_losses(window, full, emb, batch.boxes, batch.masks,
                              _sample_policy(policy, gen), gen, boxes_per_image, full_share, jitter,
                              teacher=teacher, distill=distill, truth_weight=truth_weight)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
        if (step + 1) % 10 == 0 or step + 1 == steps:
            now = time.time()
            avg = {k: sum(r[k] for r in history[-10:]) / len(history[-10:]) for k in terms}
            log(f"step {step + 1}/{steps} " + " ".join(f"{k} {avg[k]:.4f}" for k in terms)
                + f" lr {opt.param_groups[0]['lr']:.2e} {(now - last) / 10:.2f}s/step "
                f"elapsed {now - t0:.0f}s")
            last = now
        if (step + 1) % save_every == 0 or step + 1 == steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"decoder": sam.mask_decoder.state_dict(), "optimizer": opt.state_dict(),
                        "generator": gen.get_state(), "step": step + 1}, tmp)
            os.replace(tmp, state_path)
    return model.eval(), config


def export_tuned(model, config, out: Path, policy: dict, log=print) -> Path:
    """Checkpoint + model directory with the windowed decoder exported for `policy`."""
    ckpt = save_checkpoint(out / "model.pt", model.state_dict(), config)
    return export_checkpoint(ckpt, out / "model", log=log, decoder_window=policy)


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: fine-tune, save the checkpoint, export the model directory."""
    p = argparse.ArgumentParser(prog="python -m cellsam_train.window_tune",
                                description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, type=Path, metavar="CKPT", help="checkpoint to tune")
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoint, model dir, log)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=2, help="frames per step")
    p.add_argument("--boxes", type=int, default=32, help="prompted cells per frame")
    p.add_argument("--full-share", type=float, default=0.2,
                   help="share of boxes decoded on the whole frame (default 0.2)")
    p.add_argument("--window-min", type=int, default=WINDOW_POLICY["min"],
                   help="smallest window side in tokens the runtime will use (default 16)")
    p.add_argument("--synth-version", type=int, default=4)
    p.add_argument("--real-data", type=Path, default=None, metavar="DIR",
                   help="real labelled images to mix in (a training split only)")
    p.add_argument("--real-fraction", type=float, default=0.35)
    p.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="weight of matching the init decoder's whole-frame masks and IoU (default 0: off)")
    p.add_argument("--truth-weight", type=float, default=1.0,
                   help="weight of the truth losses (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--workers", type=int, default=1, help="data-generation processes")
    p.add_argument("--export-only", action="store_true",
                   help="only (re-)export OUT/model.pt to OUT/model")
    args = p.parse_args(argv)
    policy = dict(WINDOW_POLICY, min=args.window_min)
    if args.export_only:
        model, _ = load_checkpoint(args.out / "model.pt")
        print(f"model directory {export_tuned(model, model.config, args.out, policy)}")
        return 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = file_logger(args.out / "tune.log")
    log(f"command: {' '.join(sys.argv)}")
    t0 = time.time()
    model, config = tune(args.init, args.out, steps=args.steps, lr=args.lr, seed=args.seed,
                         batch_size=args.batch_size, boxes_per_image=args.boxes,
                         full_share=args.full_share, synth_version=args.synth_version,
                         real_data=args.real_data, real_fraction=args.real_fraction,
                         policy=policy, workers=args.workers, distill=args.distill,
                         truth_weight=args.truth_weight, log=log)
    log(f"tuning done in {time.time() - t0:.0f}s")
    log(f"model directory {export_tuned(model, config, args.out, policy, log=log)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
