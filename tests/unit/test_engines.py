"""TensorRT engine bookkeeping that needs no GPU: names, profiles, staleness, lookup, FP32 islands,
and the TensorRT backend's input splitting. Building and running engines is in test_gpu.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellsam_rt.backends.tensorrt import build, engines
from cellsam_rt.backends.base import BackendError
from cellsam_rt.backends.tensorrt.backend import batch_chunks, decoder_chunks
from cellsam_rt.backends.tensorrt.build import LayerInfo, select_fp32_layers
from cellsam_rt.backends.tensorrt.engines import (EngineMismatchError, EngineNotFoundError, GpuIdentity,
                                check_engine_fresh, engine_name, engine_record, find_engine,
                                profile_shapes, sidecar_path, write_sidecar)
from cellsam_rt.model_dir import ModelDir

H100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
L4 = GpuIdentity("NVIDIA L4", "8.9")


# ---------------------------------------------------------------- names

def test_engine_name_carries_graph_version_gpu_and_precision():
    name = engine_name("encoder", "10.8.0.43", "NVIDIA H100 80GB HBM3", (9, 0), "fp16")
    assert name == "encoder.trt10.8.0.43.sm90-NVIDIA_H100_80GB_HBM3.fp16.engine"


@pytest.mark.parametrize("cc", [(9, 0), "9.0", "90", "sm90", "sm_90"])
def test_engine_name_accepts_compute_capability_spellings(cc):
    assert ".sm90-" in engine_name("decoder", "10.8.0", "X", cc, "fp32")


def test_engine_name_sanitises_gpu_names():
    name = engine_name("cellfinder", "10.8.0", " NVIDIA GeForce RTX 4090/ti (rev. 2) ", "8.9", "fp32")
    assert name == "cellfinder.trt10.8.0.sm89-NVIDIA_GeForce_RTX_4090_ti_rev_2.fp32.engine"
    stem = name[: -len(".engine")]
    # Exactly five dot-separated fields after the version's own dots: nothing leaks from the GPU.
    assert stem.split(".")[-1] == "fp32" and "/" not in name and " " not in name


def test_engine_name_three_digit_compute_capability():
    assert ".sm100-" in engine_name("encoder", "10.9.0", "NVIDIA B200", "10.0", "fp16")
    assert ".sm120-" in engine_name("encoder", "10.9.0", "RTX 5090", "120", "fp16")


def test_engine_name_rejects_unknown_graph_precision_and_version():
    with pytest.raises(ValueError, match="unknown graph"):
        engine_name("neck", "10.8.0", "X", "9.0", "fp16")
    with pytest.raises(ValueError, match="precision"):
        engine_name("encoder", "10.8.0", "X", "9.0", "int8")
    with pytest.raises(ValueError, match="TensorRT version"):
        engine_name("encoder", "dev", "X", "9.0", "fp16")
    with pytest.raises(ValueError, match="compute capability"):
        engine_name("encoder", "10.8.0", "X", "nine", "fp16")


def test_sidecar_sits_beside_the_engine():
    path = Path("/m/encoder.trt10.8.0.sm90-X.fp16.engine")
    assert sidecar_path(path) == Path("/m/encoder.trt10.8.0.sm90-X.fp16.json")


# ---------------------------------------------------------------- profiles

def test_profile_shapes_from_tiny_model_dir(tiny_model_dir):
    model = ModelDir.load(tiny_model_dir)
    s = model.image_size
    c, h, w = model.embedding_shape
    enc = profile_shapes(model, "encoder", max_batch=8, max_boxes=300)
    assert enc == {"image": ((1, 3, s, s), (4, 3, s, s), (8, 3, s, s))}
    assert profile_shapes(tiny_model_dir, "cellfinder", 8, 300) == enc  # a path works too
    dec = profile_shapes(dict(model.manifest), "decoder", max_batch=8, max_boxes=300)
    assert dec == {"embeddings": ((1, c, h, w), (4, c, h, w), (8, c, h, w)),
                   "boxes": ((1, 4), (64, 4), (300, 4)),
                   "box_image": ((1,), (64,), (300,))}


def test_profile_opt_never_exceeds_max(tiny_model_dir):
    dec = profile_shapes(tiny_model_dir, "decoder", max_batch=2, max_boxes=16)
    for lo, opt, hi in dec.values():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    assert dec["boxes"][1] == (16, 4) and dec["embeddings"][1][0] == 2
    custom = profile_shapes(tiny_model_dir, "encoder", 8, 300, opt_batch=1)
    assert custom["image"][1][0] == 1


def test_profile_rejects_bad_limits(tiny_model_dir):
    with pytest.raises(ValueError):
        profile_shapes(tiny_model_dir, "encoder", max_batch=0)
    with pytest.raises(ValueError, match="unknown graph"):
        profile_shapes(tiny_model_dir, "mask", 4, 4)


# ---------------------------------------------------------------- staleness

def _record(**over):
    rec = {"engine": "encoder.trt10.8.0.43.sm90-NVIDIA_H100_80GB_HBM3.fp16.engine",
           "graph": "encoder", "precision": "fp16", "tensorrt": "10.8.0.43",
           "gpu": {"name": H100.name, "compute_capability": "9.0"}, "model_dir": "/models/cellsam"}
    rec.update(over)
    return rec


def test_fresh_engine_passes():
    assert check_engine_fresh(_record(), "10.8.0.43", H100)["graph"] == "encoder"
    assert check_engine_fresh(_record(), "10.8.0.43", (H100.name, (9, 0)))


def test_engine_for_other_tensorrt_is_refused_with_rebuild_command():
    with pytest.raises(EngineMismatchError) as exc:
        check_engine_fresh(_record(), "10.9.0.34", H100)
    msg = str(exc.value)
    assert "built for TensorRT 10.8.0.43 on GPU NVIDIA H100 80GB HBM3 (sm90)" in msg
    assert "TensorRT 10.9.0.34" in msg
    assert "rebuild with: cellsam-rt build-engines /models/cellsam --precision fp16" in msg


def test_engine_for_other_gpu_is_refused():
    with pytest.raises(EngineMismatchError, match=r"on GPU NVIDIA H100.*this machine has .*NVIDIA L4"):
        check_engine_fresh(_record(), "10.8.0.43", L4)
    # Same name, other compute capability (e.g. a MIG/driver mix-up) is a different target too.
    with pytest.raises(EngineMismatchError):
        check_engine_fresh(_record(), "10.8.0.43", GpuIdentity(H100.name, "8.0"))


def test_broken_or_missing_sidecar_is_refused(tmp_path):
    with pytest.raises(EngineMismatchError, match="lacks the TensorRT version"):
        check_engine_fresh({"graph": "encoder"}, "10.8.0", H100)
    with pytest.raises(EngineMismatchError, match="missing"):
        check_engine_fresh(tmp_path / "encoder.trt10.8.0.sm90-X.fp16.engine", "10.8.0", H100)
    bad = tmp_path / "encoder.trt10.8.0.sm90-X.fp16.json"
    bad.write_text("{not json")
    with pytest.raises(EngineMismatchError, match="unreadable"):
        check_engine_fresh(bad, "10.8.0", H100)


# ---------------------------------------------------------------- lookup in a model directory

@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return ModelDir.load(dst)


def _place_engine(model: ModelDir, graph: str, precision: str, trt: str, gpu: GpuIdentity,
                  typing: str = "weak") -> Path:
    """An engine file as build_engines leaves it: the plan (opaque bytes here) and its record."""
    src = "fp16" if (precision == "fp16" and typing == "strong") else "fp32"
    shapes = profile_shapes(model, graph, 4, 256)
    rec = engine_record(model, graph, precision, trt, gpu, shapes, typing=typing,
                        source_precision=src)
    path = model.path / rec["engine"]
    path.write_bytes(b"plan")
    write_sidecar(path, rec)
    return path


def test_find_engine_returns_the_matching_engine(model_copy):
    path = _place_engine(model_copy, "decoder", "fp16", "10.8.0.43", H100)
    assert find_engine(model_copy, "decoder", "fp16", "10.8.0.43", H100) == path
    rec = json.loads(sidecar_path(path).read_text())
    assert rec["profile"]["boxes"] == {"min": [1, 4], "opt": [64, 4], "max": [256, 4]}
    assert rec["source"]["file"] == "decoder.onnx" and len(rec["source"]["sha256"]) == 64


def test_find_engine_refuses_engines_built_elsewhere(model_copy):
    _place_engine(model_copy, "encoder", "fp16", "10.7.0.23", L4)
    with pytest.raises(EngineMismatchError) as exc:
        find_engine(model_copy, "encoder", "fp16", "10.8.0.43", H100)
    msg = str(exc.value)
    assert "TensorRT 10.7.0.23 on GPU NVIDIA L4" in msg
    assert f"cellsam-rt build-engines {model_copy.path} --precision fp16" in msg


def test_find_engine_without_engines_says_how_to_build(model_copy):
    with pytest.raises(EngineNotFoundError, match="build them with: cellsam-rt build-engines"):
        find_engine(model_copy, "cellfinder", "fp32", "10.8.0.43", H100)
    # EngineError is a BackendError: the CLI reports it like any backend problem.
    assert issubclass(EngineNotFoundError, BackendError)


def test_find_engine_refuses_engine_from_reexported_graph(model_copy):
    _place_engine(model_copy, "encoder", "fp32", "10.8.0.43", H100)
    onnx = model_copy.graph_path("encoder", "fp32")
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # a re-export changes the graph file
    with pytest.raises(EngineMismatchError, match="different encoder graph"):
        find_engine(model_copy, "encoder", "fp32", "10.8.0.43", H100)
    assert find_engine(model_copy, "encoder", "fp32", "10.8.0.43", H100, verify_source=False)


def test_strong_typed_fp16_engine_records_the_fp16_graph(model_copy):
    path = _place_engine(model_copy, "encoder", "fp16", "11.4.0.106", H100, typing="strong")
    rec = json.loads(sidecar_path(path).read_text())
    assert rec["source"]["file"] == "encoder.fp16.onnx" and rec["typing"] == "strong"
    assert find_engine(model_copy, "encoder", "fp16", "11.4.0.106", H100) == path


# ---------------------------------------------------------------- FP32 islands in FP16 engines

def _layernorm2d(start: int, x: str, tag: str) -> list[LayerInfo]:
    """SAM's LayerNorm2d as an ONNX parser lays it out: mean, centre, square, mean, +eps, sqrt, div."""
    L = LayerInfo
    return [
        L(start + 0, "reduce_mean", (x,), (f"{tag}.u",)),
        L(start + 1, "sub", (x, f"{tag}.u"), (f"{tag}.xc",)),
        L(start + 2, "constant", (), (f"{tag}.two",)),
        L(start + 3, "pow", (f"{tag}.xc", f"{tag}.two"), (f"{tag}.sq",)),
        L(start + 4, "reduce_mean", (f"{tag}.sq",), (f"{tag}.var",)),
        L(start + 5, "constant", (), (f"{tag}.eps",)),
        L(start + 6, "add", (f"{tag}.var", f"{tag}.eps"), (f"{tag}.ve",)),
        L(start + 7, "sqrt", (f"{tag}.ve",), (f"{tag}.sd",)),
        L(start + 8, "sub", (x, f"{tag}.u"), (f"{tag}.xc2",)),
        L(start + 9, "div", (f"{tag}.xc2", f"{tag}.sd"), (f"{tag}.out",)),
        L(start + 10, "mul", (f"{tag}.out", "w"), (f"{tag}.scaled",)),
    ]


def test_fp32_islands_cover_norms_softmax_layernorm_chains_and_sincos():
    L = LayerInfo
    layers = [
        L(0, "conv", ("image",), ("c0",)),
        *_layernorm2d(1, "c0", "ln"),                       # 1..11
        L(12, "matmul", ("ln.scaled", "wq"), ("q",)),
        L(13, "softmax", ("q",), ("attn",)),
        L(14, "normalization", ("attn",), ("n",)),
        L(15, "matmul", ("n", "wv"), ("v",)),
        # positional encoding: coords -> *2-1 -> matmul(gauss) -> *2pi -> sin/cos
        L(16, "mul", ("coords", "two"), ("c2",)),
        L(17, "sub", ("c2", "one"), ("c3",)),
        L(18, "matmul", ("c3", "gauss"), ("proj",)),
        L(19, "mul", ("proj", "twopi"), ("arg",)),
        L(20, "sin", ("arg",), ("s",)),
        L(21, "cos", ("arg",), ("c",)),
        L(22, "other", ("v",), ("shape",), float_outputs=False),
    ]
    chosen = select_fp32_layers(layers)
    assert {13, 14} <= chosen                               # softmax, LayerNormalization
    assert {1, 2, 4, 5, 7, 8, 9, 10} <= chosen              # the LayerNorm2d chain
    assert {19, 20, 21} <= chosen                           # sin/cos and their argument
    assert 11 not in chosen                                 # the affine after the norm stays FP16
    assert not chosen & {0, 12, 15, 18}                     # heavy layers stay FP16
    assert not chosen & {16, 17}                            # upstream of a matmul: not walked
    assert 22 not in chosen and 3 not in chosen and 6 not in chosen  # non-float, constants


def test_fp32_islands_ignore_lookalikes():
    L = LayerInfo
    # A division by a square root that is not a variance (no mean of squares): left alone.
    layers = [L(0, "sqrt", ("x",), ("r",)), L(1, "add", ("r", "e"), ("a",)),
              L(2, "div", ("y", "a"), ("d",)), L(3, "reduce_mean", ("d",), ("m",))]
    assert select_fp32_layers(layers) == set()


def test_typing_choice_follows_tensorrt_capabilities():
    from types import SimpleNamespace as NS

    trt10 = NS(__version__="10.8.0.43", BuilderFlag=NS(FP16=1, OBEY_PRECISION_CONSTRAINTS=2))
    trt11 = NS(__version__="11.4.0.106", BuilderFlag=NS(TF32=1))
    assert build.resolve_typing("auto", trt10) == "weak"
    assert build.resolve_typing("strong", trt10) == "strong"
    assert build.resolve_typing("auto", trt11) == "strong"
    with pytest.raises(engines.EngineError, match="no weak typing"):
        build.resolve_typing("weak", trt11)


# ---------------------------------------------------------------- the backend's input splitting

def test_batch_chunks_cover_in_order():
    assert batch_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert batch_chunks(0, 4) == [] and batch_chunks(3, 8) == [slice(0, 3)]


def test_decoder_chunks_when_all_embeddings_fit():
    box_image = np.array([0, 0, 1, 2, 2, 2, 1])
    chunks = decoder_chunks(box_image, num_images=3, max_images=4, max_boxes=3)
    assert [c[0] for c in chunks] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert all(ids is None for _, ids in chunks)


def test_decoder_chunks_limit_images_per_call_and_keep_order():
    rng = np.random.default_rng(0)
    box_image = np.sort(rng.integers(0, 9, size=200))
    box_image[50:60] = rng.integers(0, 9, size=10)  # not sorted everywhere
    chunks = decoder_chunks(box_image, num_images=9, max_images=2, max_boxes=16)
    covered = np.concatenate([np.arange(len(box_image))[s] for s, _ in chunks])
    assert np.array_equal(covered, np.arange(len(box_image)))  # every box once, in order
    for s, ids in chunks:
        assert s.stop - s.start <= 16 and len(ids) <= 2
        assert set(box_image[s].tolist()) <= set(ids.tolist())
        remap = np.searchsorted(ids, box_image[s])
        assert np.array_equal(ids[remap], box_image[s])


def test_decoder_chunks_reject_out_of_range_images():
    with pytest.raises(BackendError, match="box_image"):
        decoder_chunks(np.array([0, 3]), num_images=3, max_images=4, max_boxes=8)


# ---------------------------------------------------------------- without TensorRT / GPU

def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_tensorrt(), reason="tensorrt is installed here")
def test_tensorrt_backend_without_tensorrt_is_a_clear_backend_error(tiny_model_dir):
    from cellsam_rt.backends import create_backend
    from cellsam_rt.backends.tensorrt.backend import TensorRTBackend

    with pytest.raises(BackendError, match="tensorrt"):
        create_backend(tiny_model_dir, backend="tensorrt", precision="fp16")
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        TensorRTBackend(tiny_model_dir)


@pytest.mark.skipif(_has_tensorrt(), reason="tensorrt is installed here")
def test_build_engines_command_without_tensorrt_fails_cleanly(tiny_model_dir, capsys):
    from cellsam_rt.cli.main import main

    rc = main(["build-engines", str(tiny_model_dir), "--max-batch", "2"])
    err = capsys.readouterr().err
    assert rc != 0 and "TensorRT is not installed" in err and "Traceback" not in err


def test_build_engines_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    from cellsam_rt.cli import build_engines

    build_engines.add_arguments(parser)
    args = parser.parse_args(["/m", "--precision", "fp32", "--max-batch", "8", "--max-boxes",
                              "512", "--graphs", "decoder", "--no-timing-cache"])
    assert (args.model, args.precision, args.max_batch, args.max_boxes, args.graphs,
            args.no_timing_cache, args.typing) == ("/m", "fp32", 8, 512, ["decoder"], True, "auto")


def test_gpu_software_report_never_raises():
    from cellsam_rt.tools.sysinfo import format_gpu_software, gpu_software

    info = gpu_software()
    assert info["onnxruntime"]["version"]
    assert "CPUExecutionProvider" in info["onnxruntime"]["providers"]
    assert set(info) >= {"tensorrt", "cuda_python", "gpus", "gpu"}
    text = format_gpu_software(info)
    assert text.startswith("onnxruntime: ") and "tensorrt: " in text and "gpu: " in text


def test_engine_dir_from_environment(model_copy, tmp_path, monkeypatch):
    elsewhere = tmp_path / "engines"
    path = _place_engine(model_copy, "encoder", "fp16", "10.8.0.43", H100)
    elsewhere.mkdir()
    path.rename(elsewhere / path.name)
    sidecar_path(path).rename(sidecar_path(elsewhere / path.name))
    with pytest.raises(EngineNotFoundError):
        find_engine(model_copy, "encoder", "fp16", "10.8.0.43", H100)
    monkeypatch.setenv(engines.ENGINE_DIR_ENV, str(elsewhere))
    assert find_engine(model_copy, "encoder", "fp16", "10.8.0.43", H100) == elsewhere / path.name
