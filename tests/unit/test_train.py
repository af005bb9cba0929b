"""Training of the small model: a few steps on tiny data run, and the loss goes down."""
from __future__ import annotations

import dataclasses
import json
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from cellsam_export.build import CellSAMConfig  # noqa: E402
from cellsam_export.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from cellsam_train.config import SMALL_CONFIG, TrainSettings  # noqa: E402
from cellsam_train.synth import generate  # noqa: E402
from cellsam_train.train import (  # noqa: E402
    Batch, assign_anchors, encode_crop, make_example, resize_labels, train)

# Same family as the shipped model, sized for a unit test: 128 px frame, 8x8 embeddings.
TINY_POINT = CellSAMConfig(
    image_size=128, sam_width=32, sam_depth=1, sam_heads=2, sam_window=4, sam_global_attn=(),
    prompt_dim=32, decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden=32,
    num_queries=(128 // 8) ** 2, detector="point",
    point_detector={"stride": 8, "widths": [8, 8, 16, 16, 16], "head_dim": 16})


def test_assignment_is_one_to_one_and_larger_cell_wins():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],      # centre (5,5) -> anchor 0
                          [2.0, 2.0, 6.0, 6.0],        # centre (4,4) -> anchor 0 too, smaller
                          [16.0, 0.0, 24.0, 8.0]])     # centre (20,4) -> anchor 2
    anchor, idx = assign_anchors(boxes, 64, 8)
    assert sorted(zip(anchor.tolist(), idx.tolist())) == [(0, 0), (2, 2)]


def test_make_example_targets_match_the_labels():
    s = generate(5, kind="nuclei", model_size=64)
    ex = make_example(s.image, s.labels, 64)
    lab = resize_labels(s.labels, 64)
    assert ex["encoder_in"].shape == ex["cellfinder_in"].shape == (3, 64, 64)
    n = len(np.unique(lab)) - 1
    assert 0 < len(ex["boxes"]) <= n and ex["masks"].shape[1:] == (16, 16)
    for box, mask in zip(ex["boxes"], ex["masks"]):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        ys, xs = np.nonzero(mask > 0)  # the low-res mask lies inside its box (in 4 px blocks)
        assert xs.min() * 4 <= x0 < xs.max() * 4 + 4 and ys.min() * 4 <= y0 < ys.max() * 4 + 4


def test_mask_targets_follow_the_decoder_resolution():
    """Patch 8 models predict S/2 masks: the targets are 2x2 block coverages of the labels."""
    s = generate(5, kind="nuclei", model_size=64)
    ex4, ex2 = make_example(s.image, s.labels, 64), make_example(s.image, s.labels, 64, 2)
    assert ex2["masks"].shape[1:] == (32, 32) and len(ex2["masks"]) == len(ex4["masks"])
    # Pooling the fine targets 2x2 gives the coarse ones (both are area coverages).
    pooled = ex2["masks"].reshape(-1, 16, 2, 16, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(pooled, ex4["masks"], atol=1e-6)


def test_warm_start_bridges_a_patch_size_change(tmp_path):
    from cellsam_export.build import build_cellsam
    from cellsam_train.train import warm_start

    torch.manual_seed(0)
    src = build_cellsam(dataclasses.replace(TINY_POINT, patch_size=16))
    path = save_checkpoint(tmp_path / "p16.pt", src.state_dict(), src.config)
    dst = build_cellsam(dataclasses.replace(TINY_POINT, patch_size=8))
    lines = []
    warm_start(dst, path, log=lines.append)
    a, b = src.state_dict(), dst.state_dict()
    for k in b:
        if "pos_embed" not in k and "patch_embed.proj.weight" not in k:
            assert torch.equal(a[k], b[k]), k
    assert b["model.image_encoder.pos_embed"].shape[1:3] == (16, 16)
    # A flat patch gives the same response through the resized kernel.
    w16, w8 = a["model.image_encoder.patch_embed.proj.weight"], b["model.image_encoder.patch_embed.proj.weight"]
    torch.testing.assert_close(w8.sum(dim=(2, 3)), w16.sum(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    assert "resized" in lines[0] and "left at init" not in lines[0]


def test_crop_encoding_equals_the_full_frame_inside_the_crop():
    from cellsam_export.build import build_cellsam

    torch.manual_seed(0)
    model = build_cellsam(SMALL_CONFIG)
    p = SMALL_CONFIG.patch_size
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        full = model.model.image_encoder(x)
        crop = encode_crop(model.model.image_encoder, x[:, :, 128:384, 256:512], (128, 256))
    # Only the neck's 3x3 conv sees zero padding at the crop border.
    ty, tx, n = 128 // p, 256 // p, 256 // p
    assert crop.shape[-1] == n
    assert torch.allclose(full[:, :, ty + 1:ty + n - 1, tx + 1:tx + n - 1],
                          crop[:, :, 1:n - 1, 1:n - 1], atol=1e-5)


def test_a_few_steps_reduce_the_loss(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    examples = [make_example(s.image, s.labels, 64)
                for s in (generate(i, kind="nuclei", model_size=64) for i in range(2))]
    batch = Batch(examples)
    ts = TrainSettings(steps=40, batch_size=2, crop=64, boxes_per_image=4, lr=2e-3, warmup=1,
                       full_frame_steps=0)
    model, history = train(tmp_path, TINY_POINT, ts, seed=0, data=itertools.repeat(batch),
                           log=lambda _m: None, save_every=0)
    first = np.mean([h["loss"] for h in history[:3]])
    last = np.mean([h["loss"] for h in history[-3:]])
    assert all(np.isfinite(h["loss"]) for h in history)
    assert last < 0.7 * first, (first, last)
    # Each part learns something: detection and mask terms both fall.
    for key in ("cls", "dice"):
        assert np.mean([h[key] for h in history[-3:]]) < np.mean([h[key] for h in history[:3]])

    # The trained model round-trips through our checkpoint format with its config.
    path = save_checkpoint(tmp_path / "m.pt", model.state_dict(), TINY_POINT)
    loaded, info = load_checkpoint(path)
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(TINY_POINT)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = model.cellfinder(x), loaded.cellfinder(x)
    assert torch.equal(a[0], b[0]) and a[0].shape == (1, 256, 2)


@pytest.mark.slow  # a whole model-directory export: about a minute on 2 cores
def test_point_detector_model_exports_without_a_cpu_detector(tmp_path):
    """The ViT encoder gets a fused-attention CPU variant; the convolutional point detector has
    no attention and keeps its plain graph only."""
    from cellsam_export.build import build_cellsam
    from cellsam_export.onnx_export import export_model_dir

    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "m.pt", build_cellsam(TINY_POINT).state_dict(), TINY_POINT)
    out = export_model_dir(path, tmp_path / "model", fp16=False, progress=None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cpu_graphs"] == {"fp32": {"encoder": "encoder.cpu.onnx"}}
    assert not (out / "cellfinder.cpu.onnx").exists()


def test_quality_matching_follows_the_better_prediction_and_is_one_to_one():
    from cellsam_train.train import match_anchors

    crop, stride = 64, 8
    g = crop // stride
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0],     # centre (12,12): anchor (1,1) = 9
                          [30.0, 30.0, 42.0, 42.0]])  # centre (36,36): anchor (4,4) = 36
    probs = torch.full((g * g,), 0.01)
    pred = torch.zeros(g * g, 4)
    pred[:, 2:] = 0.01  # tiny boxes everywhere: IoU ~ 0
    # The anchor right of cell 0's centre anchor predicts its box exactly and is confident.
    pred[10] = boxes[0] / crop
    probs[10] = 0.9
    anchor, idx = match_anchors(boxes, crop, stride, probs, pred, boxes / crop)
    got = dict(zip(idx.tolist(), anchor.tolist()))
    assert got[0] == 10
    assert got[1] == 36  # no useful prediction: the centre prior picks the centre anchor
    # Two cells whose centres share an anchor still get two different anchors.
    two = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 8.0, 8.0]])
    anchor, idx = match_anchors(two, crop, stride, torch.full((g * g,), 0.5), pred, two / crop)
    assert len(set(anchor.tolist())) == 2 and sorted(idx.tolist()) == [0, 1]


def test_crop_phase_then_whole_frame_phase_from_the_synthetic_stream(tmp_path):
    torch.manual_seed(0)
    ts = TrainSettings(steps=3, batch_size=1, crop=64, boxes_per_image=2, warmup=1,
                       full_frame_steps=1, full_frame_boxes=2)
    lines = []
    _, history = train(tmp_path, TINY_POINT, ts, seed=0, workers=0, log=lines.append, save_every=1)
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    assert any("whole-frame phase: steps 3-3" in m for m in lines)
    # The frame phase has its own, lower schedule.
    assert history[2]["lr"] < history[1]["lr"]
    # Resuming a finished run does no more steps.
    _, again = train(tmp_path, TINY_POINT, ts, seed=0, workers=0, log=lines.append)
    assert again == [] and any("resumed" in m and "step 3" in m for m in lines)


def test_ship_installs_the_run_with_its_note_and_removes_stale_files(tmp_path):
    from cellsam_train import ship
    from synthetic_model import make_synthetic_model_dir

    run = tmp_path / "run"
    make_synthetic_model_dir(run / "model", precisions=("fp32",))
    # A run's export carries a CPU encoder variant; the package ships the portable graphs only.
    src_manifest = json.loads((run / "model" / "manifest.json").read_text())
    src_manifest["cpu_graphs"] = {"fp32": {"encoder": "encoder.cpu.onnx"}}
    (run / "model" / "manifest.json").write_text(json.dumps(src_manifest))
    (run / "model" / "encoder.cpu.onnx").write_bytes(b"cpu graph")
    (run / "model.pt").write_bytes(b"checkpoint")
    dest, ckpt = tmp_path / "default", tmp_path / "default_model.pt"
    dest.mkdir()
    (dest / "encoder.old.onnx").write_bytes(b"stale")
    size = ship.install_default(run, dest, ckpt, note="img2d F1@0.5 0.9.")
    assert not (dest / "encoder.old.onnx").exists() and ckpt.read_bytes() == b"checkpoint"
    installed = json.loads((dest / "manifest.json").read_text())
    source = json.loads((run / "model" / "manifest.json").read_text())
    assert installed["description"].endswith("img2d F1@0.5 0.9.")
    assert installed["graphs"] == source["graphs"]
    assert "cpu_graphs" not in installed and not (dest / "encoder.cpu.onnx").exists()
    assert size == sum((dest / f).stat().st_size for f in installed["graphs"]["fp32"].values()) \
        + (run / "model" / "manifest.json").stat().st_size


def test_ship_writes_object_diameter_and_credits_real_training_data(tmp_path):
    from cellsam_train import ship
    from cellsam_train.synth_v4 import CORE_DIAMETER
    from synthetic_model import make_synthetic_model_dir

    run = tmp_path / "run"
    make_synthetic_model_dir(run / "model", precisions=("fp32",))
    (run / "model.pt").write_bytes(b"checkpoint")
    (run / "train.log").write_text(
        "[00:00:01] command: __main__.py --out run --synth-version 4 --real-data /d/training-data\n"
        '[00:00:02] settings: {"steps": 10, "synth_version": 4, "real_fraction": 0.35}\n')
    dest, ckpt = tmp_path / "default", tmp_path / "default_model.pt"
    ship.install_default(run, dest, ckpt)
    installed = json.loads((dest / "manifest.json").read_text())
    assert CORE_DIAMETER[0] < installed["object_diameter"] < CORE_DIAMETER[1]
    assert "mnfinder" in installed["description"] and "MIT" in installed["description"]
    assert "35%" in installed["description"] and "only" not in installed["description"]
    # A synthetic-only run of an earlier generator states no diameter and credits nothing.
    (run / "train.log").write_text('[00:00:02] settings: {"steps": 10, "synth_version": 3}\n')
    ship.install_default(run, dest, ckpt)
    installed = json.loads((dest / "manifest.json").read_text())
    assert "object_diameter" not in installed and "mnfinder" not in installed["description"]
    ship.install_default(run, dest, ckpt, object_diameter=24)
    assert json.loads((dest / "manifest.json").read_text())["object_diameter"] == 24


def test_ship_of_a_window_tune_run_keeps_the_installed_scale_and_names_the_tuning(tmp_path):
    from cellsam_train import ship
    from synthetic_model import make_synthetic_model_dir

    run = tmp_path / "run"
    make_synthetic_model_dir(run / "model", precisions=("fp32",))
    (run / "model.pt").write_bytes(b"tuned")
    (run / "tune.log").write_text(
        '[00:00:02] settings: {"steps": 10, "synth_version": 4, "real_fraction": 0.35}\n')
    dest, ckpt = tmp_path / "default", tmp_path / "default_model.pt"
    dest.mkdir()
    (dest / "manifest.json").write_text(json.dumps({"object_diameter": 25}))
    ship.install_default(run, dest, ckpt)
    installed = json.loads((dest / "manifest.json").read_text())
    assert installed["object_diameter"] == 25  # not the version 4 generator's
    assert "window_tune" in installed["description"] and "mnfinder" in installed["description"]


def test_ship_targets_the_runtime_package_default_model():
    from pathlib import Path

    import cellsam_rt
    from cellsam_train import ship

    assert ship.DEFAULT_MODEL_DIR == Path(cellsam_rt.__file__).resolve().parent / "models" / "default"
    assert ship.DEFAULT_CHECKPOINT.name == "default_model.pt" and ship.DEFAULT_CHECKPOINT.parent.name == "cellsam_train"


def test_distillation_is_still_at_the_teacher_and_pulls_toward_it():
    from cellsam_train.train import distill_losses

    gen = torch.Generator().manual_seed(0)
    t_logits = torch.randn(2, 16, 2, generator=gen) * 3
    t_boxes = torch.rand(2, 16, 4, generator=gen)
    logits = t_logits.clone().requires_grad_(True)
    boxes = t_boxes.clone().requires_grad_(True)
    score, box = distill_losses(logits, boxes, t_logits, t_boxes)
    (score + box).backward()
    assert float(box.detach()) == 0.0
    assert float(logits.grad.abs().max()) < 1e-6  # BCE's gradient is sigmoid(s) - p_teacher
    # Away from the teacher the gradient points back to it.
    moved = (t_logits + 1.0).requires_grad_(True)
    distill_losses(moved, t_boxes, t_logits, t_boxes)[0].backward()
    assert bool((moved.grad[..., 0] > 0).all()) and bool((moved.grad[..., 1] == 0).all())


def test_replay_examples_are_flagged_and_come_from_the_replay_generator():
    from cellsam_train.train import SynthStream

    stream = SynthStream(base_seed=0, image_size=64, version=4, replay_version=3, replay_fraction=0.5)
    flags = [stream.is_replay(i) for i in range(12)]
    assert 0 < sum(flags) < 12
    i = flags.index(True)
    image, _ = stream.sample(i)
    assert np.array_equal(image, generate(i, model_size=64, version=3).image)
    example = next(iter(SynthStream(base_seed=0, image_size=64, start=i, version=4,
                                    replay_version=3, replay_fraction=0.5)))
    assert example["replay"] is True and Batch([example]).replay.tolist() == [True]


def test_replay_distillation_trains_against_the_init_detector(tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    from cellsam_export.build import build_cellsam

    save_checkpoint(init, build_cellsam(TINY_POINT).state_dict(), TINY_POINT)
    examples = [make_example(s.image, s.labels, 64)
                for s in (generate(i, kind="nuclei", model_size=64) for i in range(2))]
    examples[0]["replay"] = True
    ts = TrainSettings(steps=3, batch_size=2, crop=64, boxes_per_image=2, lr=1e-3, warmup=1,
                       full_frame_steps=0, replay_version=3, replay_fraction=0.5, replay_distill=1.0)
    _, history = train(tmp_path / "run", TINY_POINT, ts, seed=0, data=itertools.repeat(Batch(examples)),
                       log=lambda _m: None, save_every=0, init=init)
    assert all(np.isfinite(h["kd"]) and h["kd"] > 0 for h in history)
    with pytest.raises(ValueError, match="needs --init"):
        train(tmp_path / "bad", TINY_POINT, ts, seed=0, data=itertools.repeat(Batch(examples)),
              log=lambda _m: None, save_every=0)


def test_mask_loss_weights_leave_out_a_mask_and_default_to_the_plain_mean():
    from cellsam_train.train import mask_losses

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=gen)
    iou = torch.rand(3, 1, generator=gen)
    truth = (torch.rand(3, 8, 8, generator=gen) > 0.5).float()
    plain = mask_losses(logits, iou, truth)
    for a, b in zip(plain, mask_losses(logits, iou, truth, torch.full((3,), 2.0))):
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    # A zero weight removes the third mask: the same as scoring the first two alone.
    for a, b in zip(mask_losses(logits[:2], iou[:2], truth[:2]),
                    mask_losses(logits, iou, truth, torch.tensor([1.0, 1.0, 0.0]))):
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, truth.unsqueeze(1))
    assert float(plain[0]) == pytest.approx(float(ref), rel=1e-6)


def test_detector_only_training_keeps_the_sam_side_and_moves_the_detector(tmp_path):
    from cellsam_export.build import build_cellsam

    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    start = build_cellsam(TINY_POINT)
    save_checkpoint(init, start.state_dict(), TINY_POINT)
    examples = [make_example(s.image, s.labels, 64)
                for s in (generate(i, kind="nuclei", model_size=64) for i in range(2))]
    ts = TrainSettings(steps=3, batch_size=2, crop=64, boxes_per_image=2, lr=1e-3, warmup=1,
                       full_frame_steps=0, train_parts="detector")
    model, history = train(tmp_path / "run", TINY_POINT, ts, seed=0,
                           data=itertools.repeat(Batch(examples)), log=lambda _m: None,
                           save_every=0, init=init)
    assert all("bce" not in h and np.isfinite(h["loss"]) for h in history)
    before, after = start.state_dict(), model.state_dict()
    sam = [k for k in after if k.startswith("model.")]
    assert sam and all(torch.equal(before[k], after[k]) for k in sam)
    moved = [k for k in after if k.startswith("cellfinder.") and not torch.equal(before[k], after[k])]
    assert moved
    with pytest.raises(ValueError, match="needs --init"):
        train(tmp_path / "bad", TINY_POINT, ts, seed=0, data=itertools.repeat(Batch(examples)),
              log=lambda _m: None, save_every=0)


@pytest.mark.parametrize("extra, names", [
    (["--replay-distill", "2", "--replay-version", "3"], "--replay-distill needs --init"),
    (["--train", "detector"], "--train detector needs --init"),
    (["--fresh-detector"], "--fresh-detector needs --init"),
])
def test_options_that_need_an_init_checkpoint_are_usage_errors(tmp_path, capsys, extra, names):
    from cellsam_train.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "run")] + extra)
    assert exc.value.code == 2 and names in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_fresh_detector_starts_from_its_random_init_and_the_rest_from_init(tmp_path):
    from cellsam_export.build import build_cellsam
    from cellsam_train.train import seed_everything

    torch.manual_seed(123)
    init = tmp_path / "init.pt"
    trained = build_cellsam(TINY_POINT)
    save_checkpoint(init, trained.state_dict(), TINY_POINT)
    seed_everything(0)
    random_init = build_cellsam(TINY_POINT).state_dict()
    examples = [make_example(s.image, s.labels, 64)
                for s in (generate(i, kind="nuclei", model_size=64) for i in range(2))]
    ts = TrainSettings(steps=1, batch_size=2, crop=64, boxes_per_image=2, lr=0.0, warmup=1,
                       full_frame_steps=0, train_parts="detector", fresh_detector=True)
    model, _ = train(tmp_path / "run", TINY_POINT, ts, seed=0, data=itertools.repeat(Batch(examples)),
                     log=lambda _m: None, save_every=0, init=init)
    after, before = model.state_dict(), trained.state_dict()
    det = [k for k in after if k.startswith("cellfinder.")]
    assert all(torch.equal(after[k], random_init[k]) for k in det)
    assert any(not torch.equal(after[k], before[k]) for k in det)
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("model."))


def test_unlabelled_objects_become_ignore_boxes_and_leave_the_classification_loss():
    """An object labelled UNLABELLED yields no target, its box in "ignore_boxes", and the
    anchors that would find it out of the focal loss (with --unlabelled ignore only)."""
    from cellsam_export.build import build_cellsam
    from cellsam_train.real_data import UNLABELLED
    from cellsam_train.train import DecoderGraph, ignored_anchors, training_losses

    s = generate(1, kind="nuclei", model_size=64)
    labels = s.labels.astype(np.int32).copy()
    n = int(labels.max())
    labels[labels == n] = UNLABELLED
    full = make_example(s.image, s.labels, 64)
    ex = make_example(s.image, labels, 64)
    assert len(ex["boxes"]) == len(full["boxes"]) - 1
    assert len(ex["ignore_boxes"]) == 1 and len(full["ignore_boxes"]) == 0
    ys, xs = np.nonzero(resize_labels(labels, 64) == UNLABELLED)
    assert ex["ignore_boxes"][0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]

    # The anchor holding the centre and a prediction on the object are ignored, a far one is not.
    ign = torch.tensor([[16.0, 16.0, 24.0, 24.0]])
    pred = torch.tensor([[0.0, 0.0, 0.05, 0.05]]).repeat(64, 1)
    pred[5] = torch.tensor([16.0, 16.0, 25.0, 24.0]) / 64
    got = ignored_anchors(ign, 64, 8, pred, ign / 64)
    assert got[2 * 8 + 2] and got[5] and int(got.sum()) == 2

    torch.manual_seed(0)
    model = build_cellsam(TINY_POINT)
    decoder = DecoderGraph(model.model)
    batch = Batch([ex])
    terms = {}
    for mode in ("ignore", "background"):
        ts = TrainSettings(crop=64, train_parts="detector", unlabelled=mode)
        terms[mode] = training_losses(model, decoder, batch, ts, torch.Generator())["cls"].item()
    assert terms["ignore"] < terms["background"]
    plain = Batch([full])
    a, b = (float(training_losses(model, decoder, plain, TrainSettings(crop=64, train_parts="detector",
                                                                         unlabelled=m),
                                  torch.Generator())["cls"]) for m in ("ignore", "background"))
    assert a == b  # nothing to ignore: the two settings agree


def test_a_focus_regime_the_generator_version_lacks_is_a_usage_error(tmp_path, capsys):
    from cellsam_train.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "run"), "--synth-version", "4", "--focus-regime", "hazy"])
    assert exc.value.code == 2 and "not a regime of --synth-version 4" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_extra_noise_brings_the_span_to_a_few_noise_deviations_in_the_images_dtype():
    from cellsam_train.train import extra_noise

    image = generate(5, model_size=96, version=4).image
    rng = np.random.default_rng(0)
    noisy = extra_noise(image, rng)
    assert noisy.dtype == image.dtype and noisy.shape == image.shape
    assert not np.array_equal(noisy, image)
    smooth = image.astype(np.float32)  # no clipping: the added noise is exactly as asked
    lo, hi = np.percentile(smooth, [1, 99])
    added = extra_noise(smooth, rng, low=5.0, high=5.0) - smooth
    assert added.std() == pytest.approx((hi - lo) / 5.0, rel=0.05)
    flat = np.full((8, 8), 3, np.uint8)
    assert extra_noise(flat, rng) is flat  # nothing to measure noise against


def test_a_noise_fraction_puts_a_share_of_the_synthetic_examples_under_noise():
    from cellsam_train.train import SynthStream

    plain = SynthStream(base_seed=0, image_size=64, version=4)
    noisy = SynthStream(base_seed=0, image_size=64, version=4, noise_fraction=0.5)
    changed = [not np.array_equal(plain.sample(i)[0], noisy.sample(i)[0]) for i in range(12)]
    assert 0 < sum(changed) < 12
    i = changed.index(True)
    np.testing.assert_array_equal(plain.sample(i)[1], noisy.sample(i)[1])  # labels unchanged
    np.testing.assert_array_equal(noisy.sample(i)[0], noisy.sample(i)[0])  # reproducible
