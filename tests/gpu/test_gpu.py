"""GPU checks: TensorRT engines built from the tiny model, run natively, against ONNX Runtime CPU.

Skipped, with the reason, where there is no CUDA-capable GPU or TensorRT/cuda-python is missing;
nothing here is simulated. `python -m pytest -m gpu` on a GPU machine runs them.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _tensorrt_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt not installed (pip install tensorrt-cu13 cuda-python, on an NVIDIA GPU)"
    from cellsam_rt.backends.tensorrt.engines import EngineError, current_gpu

    try:
        current_gpu()
    except EngineError as exc:
        return f"no CUDA-capable GPU: {exc}"
    return None


def _ort_cuda_skip_reason() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install cellsam-rt[gpu])"
    from cellsam_rt.tools.sysinfo import nvml_gpus

    return None if nvml_gpus() else "no CUDA-capable GPU (NVML finds none)"


_TRT_SKIP = _tensorrt_skip_reason()
needs_tensorrt = pytest.mark.skipif(_TRT_SKIP is not None, reason=_TRT_SKIP or "")
MAX_BATCH, MAX_BOXES = 2, 16  # small profiles, so that the tests exercise input splitting


@pytest.fixture(scope="module")
def engine_model(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model with FP32 and FP16 engines built beside its manifest."""
    if _TRT_SKIP:
        pytest.skip(_TRT_SKIP)
    from cellsam_rt.backends.tensorrt.build import build_engines

    dst = tmp_path_factory.mktemp("trt") / "model"
    shutil.copytree(tiny_model_dir, dst)
    for precision in ("fp32", "fp16"):
        build_engines(dst, precision=precision, max_batch=MAX_BATCH, max_boxes=MAX_BOXES,
                      workspace_gb=2)
    return dst


def _inputs(model_dir, n_images=3, n_boxes=40, seed=0):
    from cellsam_rt.model_dir import ModelDir

    model = ModelDir.load(model_dir)
    rng = np.random.default_rng(seed)
    S = model.image_size
    c, h, w = model.embedding_shape
    image = rng.standard_normal((n_images, 3, S, S)).astype(np.float32)
    xy = rng.uniform(0, S * 0.8, size=(n_boxes, 2))
    wh = rng.uniform(8, S * 0.3, size=(n_boxes, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    box_image = np.sort(rng.integers(0, n_images, size=n_boxes)).astype(np.int64)
    return image, boxes, box_image, (c, h, w)


def _close(got, ref, rel):
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert got.shape == ref.shape
    assert err <= rel * scale, f"max |diff| {err:.4g} > {rel} x max|ref| {scale:.4g}"


@needs_tensorrt
def test_engines_and_sidecars_are_written_with_current_names(engine_model):
    from cellsam_rt.backends.tensorrt.engines import (current_gpu, current_trt_version, engine_name, sidecar_path,
                                    timing_cache_name)

    gpu, trt = current_gpu(), current_trt_version()
    for precision in ("fp32", "fp16"):
        for graph in ("encoder", "cellfinder", "decoder"):
            path = engine_model / engine_name(graph, trt, gpu.name, gpu.compute_capability, precision)
            assert path.is_file() and path.stat().st_size > 0
            rec = json.loads(sidecar_path(path).read_text())
            assert rec["tensorrt"] == trt and rec["gpu"]["name"] == gpu.name
            assert rec["precision"] == precision and rec["max_batch"] == MAX_BATCH
    assert (engine_model / timing_cache_name(trt, gpu.name, gpu.compute_capability)).is_file()
    assert not list(engine_model.glob(".*.tmp"))  # atomic writes left no temporaries


@needs_tensorrt
@pytest.mark.parametrize("precision,rel", [("fp32", 2e-2), ("fp16", 6e-2)])
def test_tensorrt_matches_onnxruntime_cpu_with_split_inputs(engine_model, precision, rel):
    from cellsam_rt.backends import create_backend

    trt = create_backend(engine_model, backend="tensorrt", precision=precision)
    ort = create_backend(engine_model, backend="cpu", precision="fp32")
    image, boxes, box_image, _ = _inputs(engine_model)  # 3 images > MAX_BATCH, 40 boxes > MAX_BOXES
    emb_ref = ort.run("encoder", {"image": image})["embeddings"]
    emb = trt.run("encoder", {"image": image})["embeddings"]
    _close(emb, emb_ref, rel)
    cf_ref, cf = ort.run("cellfinder", {"image": image}), trt.run("cellfinder", {"image": image})
    for name in ("class_logits", "boxes"):
        _close(cf[name], cf_ref[name], rel)
    dec_in = {"embeddings": emb_ref, "boxes": boxes, "box_image": box_image}
    ref, got = ort.run("decoder", dec_in), trt.run("decoder", dec_in)
    _close(got["mask_logits"], ref["mask_logits"], rel)
    _close(got["iou"], ref["iou"], rel)
    empty = trt.run("decoder", {"embeddings": emb_ref, "boxes": boxes[:0], "box_image": box_image[:0]})
    assert empty["mask_logits"].shape[0] == 0 and empty["iou"].shape == (0, 1)
    trt.close()
    again = trt.run("encoder", {"image": image[:1]})["embeddings"]  # reloads after close
    _close(again, emb_ref[:1], rel)


@needs_tensorrt
def test_stale_engine_is_refused_with_the_rebuild_command(engine_model, tmp_path):
    from cellsam_rt.backends.tensorrt.backend import TensorRTBackend
    from cellsam_rt.backends.tensorrt.engines import EngineMismatchError, sidecar_path

    stale = tmp_path / "model"
    shutil.copytree(engine_model, stale)
    for engine in stale.glob("encoder.*.fp32.engine"):
        side = sidecar_path(engine)
        rec = json.loads(side.read_text())
        rec["tensorrt"] = "9.0.0.1"
        side.write_text(json.dumps(rec))
    with pytest.raises(EngineMismatchError, match=r"TensorRT 9\.0\.0\.1.*rebuild with: cellsam-rt build-engines"):
        TensorRTBackend(stale, precision="fp32")


@needs_tensorrt
def test_segmenter_on_tensorrt_agrees_with_ort_cpu(engine_model):
    pipeline = pytest.importorskip("cellsam_rt.pipeline.segmenter")
    rng = np.random.default_rng(3)
    img = rng.gamma(2.0, 200.0, size=(300, 280)).astype(np.uint16)
    ref = pipeline.Segmenter(engine_model, backend="cpu", precision="fp32", tile="never").segment(img)
    got = pipeline.Segmenter(engine_model, backend="tensorrt", precision="fp32", tile="never").segment(img)
    assert got.labels.shape == ref.labels.shape
    # Same foreground almost everywhere: FP32 engines (TF32 matmuls) move few boundary pixels.
    assert np.mean((got.labels > 0) == (ref.labels > 0)) > 0.99


@pytest.mark.skipif(_ort_cuda_skip_reason() is not None, reason=_ort_cuda_skip_reason() or "")
def test_onnxruntime_cuda_matches_cpu(tiny_model_dir):
    from cellsam_rt.backends import create_backend

    image, *_ = _inputs(tiny_model_dir, n_images=2)
    ref = create_backend(tiny_model_dir, backend="cpu").run("encoder", {"image": image})
    got = create_backend(tiny_model_dir, backend="cuda").run("encoder", {"image": image})
    _close(got["embeddings"], ref["embeddings"], 2e-2)
