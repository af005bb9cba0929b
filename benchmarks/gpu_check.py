#!/usr/bin/env python3
"""One-shot GPU check: engines, parity against ONNX Runtime CPU, latency and throughput.

    python benchmarks/gpu_check.py --json gpu_check.json                # random full-size model
    python benchmarks/gpu_check.py --model DIR --json gpu_check.json    # an exported model dir

Needs the package importable: installed, or from a bare checkout with
`PYTHONPATH=runtime:export python benchmarks/gpu_check.py ...` (e.g. on a machine with no registry).

Steps (each guarded: a step that cannot run says why and the rest go on):
 1. environment: GPU, driver, onnxruntime/TensorRT/cuda-python versions (cellsam_rt.tools.sysinfo);
 2. model: `--model DIR`, or a random-weight export of `--config` (full: ViT-B at 1024) via
    cellsam_export;
 3. reference outputs of every graph from ONNX Runtime CPU, FP32, on a preprocessed synthetic
    image and random prompt boxes;
 4. TensorRT: build FP16 then FP32 engines (cellsam_rt.backends.tensorrt.engines), parity of every graph against
    step 3, per-graph latency (batch 1) and encoder/CellFinder throughput at the largest batch;
 5. ONNX Runtime CUDA (when onnxruntime-gpu is installed): the same parity and latency;
 6. end to end: `Segmenter` on the fastest GPU backend, per-stage times, images/s one by one
    and pipelined (cellsam_rt.pipeline.runner.segment_many);
 7. anchor: the PyTorch reference pipeline (cellsam_export.reference) on the GPU under FP16
    autocast, when torch sees CUDA.
A time budget (`--budget`, default 450 s) skips later steps rather than overrun; `--json` gets
everything measured. Timings are wall-clock medians after warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path


import numpy as np  # noqa: E402

GRAPHS = ("encoder", "cellfinder", "decoder")
RESULTS: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                 "steps": {}, "parity": {}, "latency_ms": {}, "throughput": {}, "end_to_end": {}}


class Unavailable(Exception):
    """A step this machine cannot run (missing package or device): reported, not a failure."""


class Budget:
    """Wall-clock budget for the whole check."""

    def __init__(self, seconds: float):
        self.t0, self.total = time.perf_counter(), seconds

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def step(name: str, budget: Budget, need: float = 0.0):
    """Decorator-like runner: run fn(), record ok/skipped/failed with the reason, never raise."""
    def wrap(fn):  # runs fn at once; the decorated name is bound to its result
        if budget.left() < need:
            msg = f"skipped: {budget.left():.0f} s left of the budget, needs ~{need:.0f} s"
            print(f"[{name}] {msg}", flush=True)
            RESULTS["steps"][name] = {"status": "skipped", "reason": msg}
            return None
        print(f"[{name}] ... ({budget.elapsed():.0f} s elapsed)", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
            RESULTS["steps"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1)}
            return out
        except Unavailable as exc:
            print(f"[{name}] unavailable: {exc}", flush=True)
            RESULTS["steps"][name] = {"status": "unavailable", "reason": str(exc)}
            return None
        except Exception as exc:  # noqa: BLE001 - report and go on
            tb = traceback.format_exc(limit=4)
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}\n{tb}", flush=True)
            RESULTS["steps"][name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                      "seconds": round(time.perf_counter() - t0, 1)}
            return None
    return wrap


def timed(fn, warmup: int, iters: int, budget_s: float = 30.0) -> dict:
    """Median/p90 wall time of fn() in ms (fewer iterations if one call is slow)."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + budget_s
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and len(times) >= 3:
            break
    times.sort()
    return {"median_ms": round(1e3 * statistics.median(times), 3),
            "p90_ms": round(1e3 * times[min(len(times) - 1, int(0.9 * len(times)))], 3),
            "iters": len(times)}


def compare(got: np.ndarray, ref: np.ndarray) -> dict:
    """Parity figures of one output against its reference."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return {"shape_mismatch": [list(got.shape), list(ref.shape)]}
    diff = np.abs(got - ref)
    scale = max(float(np.abs(ref).max()), 1e-12)
    out = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
           "max_rel_to_range": float(diff.max() / scale),
           "finite": bool(np.isfinite(got).all())}
    return out


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """A uint16 fluorescence-like image: noisy background and bright round cells."""
    rng = np.random.default_rng(seed)
    img = rng.gamma(2.0, 150.0, size=(size, size))
    yy, xx = np.mgrid[:size, :size]
    for _ in range(max(20, size // 8)):
        cy, cx = rng.integers(0, size, 2)
        r = rng.integers(6, 24)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.uniform(1500, 4000)
    return img.astype(np.uint16)


def random_boxes(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n xyxy boxes in S-space of cell-like sizes."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, size * 0.9, (n, 2))
    wh = rng.uniform(size * 0.01, size * 0.08, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


# ---------------------------------------------------------------- steps


def export_model(args, work: Path) -> Path:
    """A random-weight model directory of args.config (exported with cellsam_export)."""
    from cellsam_export.onnx_export import export_model_dir
    from cellsam_export.testing import make_random_checkpoint

    ckpt = make_random_checkpoint(work / f"random_{args.config}.pt", config=args.config, seed=0)
    RESULTS["checkpoint"] = str(ckpt)
    out = work / f"model_{args.config}"
    export_model_dir(ckpt, out, fp16=True, force=True, progress=lambda m: print("   ", m, flush=True))
    return out


def ort_reference(model, n_boxes: int) -> dict:
    """Inputs and ONNX Runtime CPU FP32 outputs of every graph at batch 1."""
    from cellsam_rt.backends import create_backend
    from cellsam_rt.stages.preprocess import preprocess

    S = model.image_size
    image = synthetic_image(S)
    enc, fin, _ = preprocess(image, S, model.has_model_cp)
    cpu = create_backend(model, backend="cpu", precision="fp32")
    ref = {"image_raw": image, "enc_in": enc[None], "fin_in": fin[None]}
    t0 = time.perf_counter()
    ref["embeddings"] = cpu.run("encoder", {"image": ref["enc_in"]})["embeddings"]
    t1 = time.perf_counter()
    ref.update(cpu.run("cellfinder", {"image": ref["fin_in"]}))
    t2 = time.perf_counter()
    ref["boxes_in"] = random_boxes(n_boxes, S)
    ref["box_image"] = np.zeros(n_boxes, np.int64)
    dec = cpu.run("decoder", {"embeddings": ref["embeddings"], "boxes": ref["boxes_in"],
                              "box_image": ref["box_image"]})
    t3 = time.perf_counter()
    ref.update(dec)
    RESULTS["latency_ms"]["ort-cpu-fp32"] = {
        "encoder": {"single_run_ms": round(1e3 * (t1 - t0), 1)},
        "cellfinder": {"single_run_ms": round(1e3 * (t2 - t1), 1)},
        f"decoder_{n_boxes}_boxes": {"single_run_ms": round(1e3 * (t3 - t2), 1)}}
    return ref


def check_backend(label: str, backend, ref: dict, args, max_batch: int) -> None:
    """Parity of every graph against the ORT CPU reference, then latency and throughput."""
    par = {}
    emb = backend.run("encoder", {"image": ref["enc_in"]})["embeddings"]
    par["encoder.embeddings"] = compare(emb, ref["embeddings"])
    cf = backend.run("cellfinder", {"image": ref["fin_in"]})
    par["cellfinder.class_logits"] = compare(cf["class_logits"], ref["class_logits"])
    par["cellfinder.boxes"] = compare(cf["boxes"], ref["boxes"])
    # Top-scoring queries (100 or all): does the engine rank the same detections first?
    k = min(100, ref["class_logits"].shape[1])
    top_ref = set(np.argsort(-ref["class_logits"][0].max(-1))[:k].tolist())
    top_got = set(np.argsort(-cf["class_logits"][0].max(-1))[:k].tolist())
    par["cellfinder.top_queries_overlap"] = len(top_ref & top_got) / k
    dec_in = {"embeddings": ref["embeddings"], "boxes": ref["boxes_in"], "box_image": ref["box_image"]}
    dec = backend.run("decoder", dec_in)
    par["decoder.mask_logits"] = compare(dec["mask_logits"], ref["mask_logits"])
    par["decoder.mask_logits"]["sign_agreement"] = float(
        np.mean((dec["mask_logits"] > 0) == (ref["mask_logits"] > 0)))
    par["decoder.iou"] = compare(dec["iou"], ref["iou"])
    RESULTS["parity"][label] = par
    for name, fig in par.items():
        print(f"    parity {label:>18} {name:<26} "
              + (f"max|d| {fig['max_abs']:.3g}  rel {fig['max_rel_to_range']:.3g}"
                 + (f"  sign-agree {fig['sign_agreement']:.5f}" if "sign_agreement" in fig else "")
                 if isinstance(fig, dict) and "max_abs" in fig else f"{fig}"), flush=True)

    lat = {}
    w, it = args.warmup, args.iters
    lat["encoder_b1"] = timed(lambda: backend.run("encoder", {"image": ref["enc_in"]}), w, it)
    lat["cellfinder_b1"] = timed(lambda: backend.run("cellfinder", {"image": ref["fin_in"]}), w, it)
    lat[f"decoder_{len(ref['boxes_in'])}_boxes"] = timed(lambda: backend.run("decoder", dec_in), w, it)
    one = ref["boxes_in"][:1]
    lat["decoder_1_box"] = timed(lambda: backend.run("decoder", {
        "embeddings": ref["embeddings"], "boxes": one, "box_image": ref["box_image"][:1]}), w, it)
    thr = {}
    if max_batch > 1:
        enc_b = np.repeat(ref["enc_in"], max_batch, 0)
        fin_b = np.repeat(ref["fin_in"], max_batch, 0)
        lat[f"encoder_b{max_batch}"] = timed(lambda: backend.run("encoder", {"image": enc_b}), w, it)
        lat[f"cellfinder_b{max_batch}"] = timed(lambda: backend.run("cellfinder", {"image": fin_b}), w, it)
        thr["encoder_images_per_s"] = round(1e3 * max_batch / lat[f"encoder_b{max_batch}"]["median_ms"], 2)
        thr["cellfinder_images_per_s"] = round(1e3 * max_batch / lat[f"cellfinder_b{max_batch}"]["median_ms"], 2)
    thr["decoder_boxes_per_s"] = round(1e3 * len(ref["boxes_in"]) /
                                       lat[f"decoder_{len(ref['boxes_in'])}_boxes"]["median_ms"], 1)
    RESULTS["latency_ms"][label] = lat
    RESULTS["throughput"][label] = thr
    for name, t in lat.items():
        print(f"    latency {label:>17} {name:<22} {t['median_ms']:9.2f} ms (p90 {t['p90_ms']:.2f})")
    print(f"    throughput {label:>14} {thr}", flush=True)


def end_to_end(model, backend_name: str, precision: str, args, budget: Budget) -> None:
    """Segmenter per-stage times and images/s, one by one and pipelined."""
    from cellsam_rt.pipeline.segmenter import Segmenter
    from cellsam_rt.pipeline.runner import segment_many

    seg = Segmenter(model, backend=backend_name, precision=precision, tile="never")
    S = model.image_size
    images = [synthetic_image(S, seed=i) for i in range(args.e2e_images)]
    user_boxes = random_boxes(64, S, seed=1)  # a fixed prompt load, comparable with the reference
    seg.segment(images[0], boxes=user_boxes)  # warm-up
    res = seg.segment(images[0], boxes=user_boxes)
    out = {"backend": seg.backend.describe(), "image": [S, S],
           "stages_64_user_boxes_s": {k: round(v, 4) for k, v in res.timings.items()}}
    det = seg.segment(images[0])
    out["with_detection"] = {"cells": det.n_cells,
                             "stages_s": {k: round(v, 4) for k, v in det.timings.items()}}
    if budget.left() > 30:
        t0 = time.perf_counter()
        for img in images:
            seg.segment(img, boxes=user_boxes)
        seq = len(images) / (time.perf_counter() - t0)
        runners: list = []
        t0 = time.perf_counter()
        from cellsam_rt.pipeline.runner import SegmentJob
        results = list(segment_many(seg, [SegmentJob(img, boxes=user_boxes) for img in images],
                                    workers=args.workers, runner_out=runners))
        pip = len(images) / (time.perf_counter() - t0)
        out["images_per_s_sequential"] = round(seq, 2)
        out["images_per_s_pipelined"] = round(pip, 2)
        out["pipelined_failed"] = sum(not r.ok for r in results)
        out["pipelined_max_in_flight"] = runners[0].stats.max_in_flight
    RESULTS["end_to_end"][f"{backend_name}-{precision}"] = out
    print(f"    {json.dumps(out)}", flush=True)


def torch_anchor(args, model_dir: Path) -> None:
    """The PyTorch reference pipeline on the GPU in FP16 autocast: the speed anchor."""
    try:
        import torch
    except ImportError as exc:
        raise Unavailable("torch is not installed") from exc

    if not torch.cuda.is_available():
        raise Unavailable(f"torch {torch.__version__} sees no CUDA device")
    from cellsam_export.checkpoint import load_checkpoint
    from cellsam_export.reference import ReferencePipeline

    ckpt = RESULTS.get("checkpoint") or args.checkpoint
    if not ckpt:
        raise RuntimeError("no checkpoint to load into PyTorch (pass --checkpoint with --model)")
    model, _ = load_checkpoint(ckpt)
    model = model.cuda().eval()
    pipe = ReferencePipeline(model)
    S = pipe.size
    image = synthetic_image(S)
    boxes = random_boxes(64, S, seed=1)  # in S-space; image is SxS so image pixels == S-space
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "image": [S, S]}
    with torch.autocast("cuda", dtype=torch.float16):
        pipe.segment(image, boxes=boxes)  # warm-up
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = pipe.segment(image, boxes=boxes)
            runs.append(time.perf_counter() - t0)
        out["stages_64_user_boxes_s"] = {k: round(v, 4) for k, v in r.timings.items()}
        out["median_s_64_user_boxes"] = round(statistics.median(runs), 4)
        enc_in = torch.randn(1, 3, S, S, device="cuda")
        with torch.no_grad():
            lat = timed(lambda: (model.sam.image_encoder(enc_in), torch.cuda.synchronize()),
                        args.warmup, args.iters)
        out["encoder_b1_fp16_autocast"] = lat
    RESULTS["end_to_end"]["torch-reference-fp16"] = out
    print(f"    {json.dumps(out)}", flush=True)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: export a random-weight one)")
    ap.add_argument("--checkpoint", help="its checkpoint, for the PyTorch anchor with --model")
    ap.add_argument("--config", default="full", help="config to export without --model")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check")
    ap.add_argument("--max-batch", type=int, default=2)
    ap.add_argument("--max-boxes", type=int, default=256)
    ap.add_argument("--boxes", type=int, default=64, help="prompt boxes for decoder parity")
    ap.add_argument("--fp32-opt-level", type=int, default=1,
                    help="builder level for the FP32 parity engines (faster builds)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--e2e-images", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args(argv)
    budget = Budget(args.budget)
    work = Path(args.work or tempfile.mkdtemp(prefix="cellsam-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    state: dict = {}

    def write_json() -> None:
        RESULTS["elapsed_s"] = round(budget.elapsed(), 1)
        if args.json:
            def default(o):
                return o.item() if hasattr(o, "item") else str(o)
            Path(args.json).write_text(json.dumps(RESULTS, indent=2, default=default) + "\n")

    @step("environment", budget)
    def _env():
        from cellsam_rt.tools.sysinfo import format_gpu_software, gpu_software

        RESULTS["software"] = gpu_software()
        RESULTS["gpu"] = RESULTS["software"]["gpu"]
        RESULTS["python"] = sys.version.split()[0]
        print(format_gpu_software(RESULTS["software"]))

    @step("model", budget)
    def _model():
        from cellsam_rt.model_dir import ModelDir

        path = Path(args.model) if args.model else export_model(args, work)
        state["model"] = ModelDir.load(path)
        m = state["model"]
        RESULTS["model"] = {"dir": str(m.path), "name": m.name, "image_size": m.image_size,
                            "embedding_shape": list(m.embedding_shape)}
        print(f"    model {m.name} at {m.path} (image {m.image_size})")

    write_json()
    if "model" not in state:
        print("no model: nothing more to check")
        write_json()
        return 1
    model = state["model"]

    @step("ort-cpu-reference", budget, need=20)
    def _ref():
        state["ref"] = ort_reference(model, args.boxes)

    gpu_backends: list[tuple[str, str, float]] = []  # (backend, precision, encoder ms)
    if "ref" in state:
        ref = state["ref"]
        for precision in ("fp16", "fp32"):
            @step(f"tensorrt-build-{precision}", budget, need=60)
            def _build(precision=precision):
                from cellsam_rt.backends.tensorrt.build import build_engines
                from cellsam_rt.backends.tensorrt.engines import EngineError, current_gpu, import_tensorrt

                try:
                    import_tensorrt()
                    current_gpu()
                except EngineError as exc:
                    raise Unavailable(str(exc)) from exc
                t0 = time.perf_counter()
                build_engines(model, precision=precision, max_batch=args.max_batch,
                              max_boxes=args.max_boxes, workspace_gb=8,
                              opt_level=None if precision == "fp16" else args.fp32_opt_level)
                RESULTS.setdefault("engine_build_s", {})[precision] = round(time.perf_counter() - t0, 1)
                state[f"built-{precision}"] = True

            if state.get(f"built-{precision}"):
                @step(f"tensorrt-{precision}", budget, need=20)
                def _trt(precision=precision):
                    from cellsam_rt.backends import create_backend

                    be = create_backend(model, backend="tensorrt", precision=precision)
                    RESULTS.setdefault("backends", {})[f"tensorrt-{precision}"] = be.describe()
                    check_backend(f"tensorrt-{precision}", be, ref, args, args.max_batch)
                    gpu_backends.append(("tensorrt", precision,
                                         RESULTS["latency_ms"][f"tensorrt-{precision}"]["encoder_b1"]["median_ms"]))
                    be.close()
            write_json()

        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            for precision in ("fp16", "fp32"):
                @step(f"ort-cuda-{precision}", budget, need=30)
                def _ortcuda(precision=precision):
                    from cellsam_rt.backends import create_backend

                    be = create_backend(model, backend="cuda", precision=precision)
                    check_backend(f"ort-cuda-{precision}", be, ref, args, args.max_batch)
                    gpu_backends.append(("cuda", precision,
                                         RESULTS["latency_ms"][f"ort-cuda-{precision}"]["encoder_b1"]["median_ms"]))
                write_json()
        else:
            msg = "skipped: onnxruntime has no CUDAExecutionProvider (pip install 'cellsam-rt[gpu]')"
            print(f"[ort-cuda] {msg}")
            RESULTS["steps"]["ort-cuda"] = {"status": "skipped", "reason": msg}

    if gpu_backends:
        backend_name, precision, _ = min(gpu_backends, key=lambda b: b[2])

        @step(f"end-to-end-{backend_name}-{precision}", budget, need=40)
        def _e2e():
            end_to_end(model, backend_name, precision, args, budget)
    else:
        RESULTS["steps"]["end-to-end"] = {"status": "skipped", "reason": "no GPU backend ran"}
        print("[end-to-end] skipped: no GPU backend ran")
    write_json()

    @step("torch-reference-fp16", budget, need=40)
    def _anchor():
        torch_anchor(args, model.path)

    write_json()
    print(f"done in {budget.elapsed():.0f} s" + (f"; results in {args.json}" if args.json else ""))
    bad = [k for k, v in RESULTS["steps"].items() if v["status"] == "failed"]
    if bad:
        print(f"failed steps: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
