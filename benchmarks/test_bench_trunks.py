"""The two ViT-B trunks (encoder, CellFinder) alone: precision and ONNX Runtime options on the CPU.

Variants (benchmarks/measure.py TRUNK_VARIANTS): the plain FP32 graph at ORT_ENABLE_ALL and at
ORT_ENABLE_BASIC; the fused-attention CPU graph (the CPU backend's default); FP32 after
onnxruntime.transformers' ViT fusions; FP32 on one thread; the FP16 graphs; INT8 dynamic
quantisation of the fused-attention graph per tensor (int8, the `cellsam-rt quantize` default
source) and per channel, of the plain graph (int8-plain), and of the plain graph with the
attention products (scores, scores x values) quantised as well (int8attn). Each runs in its own
process (a full-size trunk session holds gigabytes after a run; its peak RSS is reported) on the
same preprocessed 512x512 input, and its outputs are compared with FP32's: relative L2 error,
max abs error and, for CellFinder, how many of FP32's 100 best queries stay in the top 100.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import record
from test_bench_decoder import run_measure

# (graph, variant, rounds, warm-up); FP32 first per graph: the others compare to it. One cold
# run each (first-run allocation costs a few %, alike for all): ~40 s per full-size run here.
CASES = [
    ("encoder", "fp32", 1, 0),
    ("encoder", "fp32-fusedattn", 1, 0),
    ("encoder", "fp32-basic", 1, 0),
    ("encoder", "fp32-vitfused", 1, 0),
    ("encoder", "fp32-1thread", 1, 0),
    ("encoder", "fp16", 1, 0),
    ("encoder", "int8", 1, 0),
    ("encoder", "int8-plain", 1, 0),
    ("encoder", "int8pc", 1, 0),
    ("encoder", "int8attn", 1, 0),
    ("cellfinder", "fp32", 1, 0),
    ("cellfinder", "fp32-fusedattn", 1, 0),
    ("cellfinder", "int8", 1, 0),
    ("cellfinder", "int8-plain", 1, 0),
    ("cellfinder", "int8pc", 1, 0),
    ("cellfinder", "int8attn", 1, 0),
]
BASE: dict = {}


@pytest.fixture(scope="module")
def outputs_dir(tmp_path_factory):
    """Where each variant's outputs are saved."""
    return tmp_path_factory.mktemp("trunk-outputs")


# Masks decoded from INT8 embeddings must stay close to FP32's: mean low-res mask IoU over the 32
# boxes (docs/performance.md has the measured values).
INT8_MASK_IOU_MIN = 0.95


def compare(graph: str, out, ref) -> dict:
    """Relative error of a variant's outputs against FP32's."""
    res = {}
    for name in ref.files:
        a, b = out[name].astype(np.float64), ref[name].astype(np.float64)
        res[name] = {"rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
                     "max_abs": float(np.abs(a - b).max()),
                     "ref_abs_max": float(np.abs(b).max())}
    if graph == "cellfinder":
        def top(x):
            return set(np.argsort(-x["class_logits"][0].max(axis=-1))[:100].tolist())
        res["top100_overlap"] = len(top(out) & top(ref)) / 100.0
    return res


@pytest.mark.parametrize("graph,variant,rounds,warmup", CASES,
                         ids=[f"{g}-{v}" for g, v, *_ in CASES])
def test_trunk(benchmark, graph, variant, rounds, warmup, model_dir, threads, outputs_dir):
    """Latency and peak memory of one trunk under one variant, and its error against FP32."""
    benchmark.group = f"trunk-{graph}"
    save = outputs_dir / f"{graph}-{variant}.npz"
    args = ["trunk", "--model", str(model_dir), "--graph", graph, "--variant", variant,
            "--rounds", str(rounds), "--warmup", str(warmup), "--threads", str(threads),
            "--save", str(save)]
    res = benchmark.pedantic(run_measure, args=tuple(args), rounds=1, iterations=1)
    out = np.load(save)
    if variant == "fp32":
        BASE[graph] = (out, res["median_s"])
    elif graph in BASE:
        ref, ref_s = BASE[graph]
        res["vs_fp32"] = compare(graph, out, ref)
        res["speedup_vs_fp32"] = ref_s / res["median_s"]
    benchmark.extra_info.update(res)
    record("trunks", f"{graph}/{variant}", res)


@pytest.mark.parametrize("variant", ["int8", "int8pc", "int8attn"])
def test_int8_mask_parity(benchmark, variant, model_dir, image_512, threads, tmp_path):
    """Masks decoded from INT8 embeddings vs from FP32 embeddings (same FP32 decoder, 32 boxes).

    The IoU filter is off (all masks pasted): with random weights most predicted IoUs are
    below 0.5, and an empty label image would prove nothing.
    """
    from cellsam_rt.backends import create_backend
    from cellsam_rt.stages.detect import boxes_to_model_space
    from cellsam_rt.stages.masks import decode_masks, paste_masks
    from cellsam_rt.model_dir import ModelDir

    from test_bench_e2e import agreement

    files = {}
    for v in ("fp32", variant):  # this test's own embeddings, one process per variant
        files[v] = tmp_path / f"encoder-{v}.npz"
        run_measure("trunk", "--model", str(model_dir), "--graph", "encoder", "--variant", v,
                    "--rounds", "1", "--warmup", "0", "--threads", str(threads),
                    "--save", str(files[v]))
    model = ModelDir.load(model_dir)
    backend = create_backend(model, threads=threads)
    boxes = boxes_to_model_space(image_512["boxes"], (512, 512), model.image_size)
    box_image = np.zeros(len(boxes), np.int64)

    def labels_for(v):
        emb = np.load(files[v])["embeddings"]
        labels = np.zeros((512, 512), np.int32)
        all_logits = []
        for kept, logits, _iou in decode_masks(backend.run, emb, boxes, box_image, 32, 0.0):
            paste_masks(labels, logits, (kept + 1).astype(np.int32), model.image_size)
            all_logits.append(logits)
        return labels, np.concatenate(all_logits)

    ref, ref_logits = labels_for("fp32")
    got, logits = benchmark.pedantic(labels_for, args=(variant,), rounds=1, iterations=1)
    res = agreement(got, ref)
    # Low-res masks too (logit > 0), per box: meaningful even when no mask reaches the labels.
    a, b = logits > 0, ref_logits > 0
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    res["lowres_mask_iou_mean"] = float(np.mean(np.where(union > 0, inter / np.maximum(union, 1),
                                                         1.0)))
    res["lowres_mask_pixels_mean"] = float(b.sum(axis=(1, 2)).mean())
    res["logits_rel_l2"] = float(np.linalg.norm(logits - ref_logits)
                                 / max(np.linalg.norm(ref_logits), 1e-30))
    benchmark.extra_info.update(res)
    record("trunks", f"mask_parity/{variant}", res)
    assert res["lowres_mask_iou_mean"] >= INT8_MASK_IOU_MIN, res
