"""Backends: the ORT backend reproduces a plain InferenceSession, and GPU requests never fall
back to the CPU silently."""
from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest

from cellsam_rt.backends import BACKENDS, Backend, BackendError, create_backend
from cellsam_rt.backends import onnxruntime as ort_backend
from cellsam_rt.backends.onnxruntime import OrtBackend, available_providers
from cellsam_rt.model_dir import GRAPH_NAMES, ModelDir

pytest.importorskip("onnx", reason="the synthetic model directory is written with onnx")
from synthetic_model import graph_inputs, make_synthetic_model_dir  # noqa: E402

HAS_CUDA = "CUDAExecutionProvider" in available_providers()
HAS_TRT_EP = "TensorrtExecutionProvider" in available_providers()
try:
    import tensorrt  # noqa: F401
    HAS_TENSORRT = True
except ImportError:
    HAS_TENSORRT = False


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_model_dir(tmp_path_factory.mktemp("syn") / "m", precisions=("fp32", "fp16"))


def _reference_outputs(path, inputs):
    """What a fresh onnxruntime session on the CPU gives for the same graph file and inputs."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))


def _check_matches_plain_session(model_dir, precision, batch=2):
    md = ModelDir.load(model_dir)
    backend = create_backend(md, "cpu", precision=precision, threads=1)
    assert isinstance(backend, Backend) and backend.name == "cpu"
    assert backend.providers == ["CPUExecutionProvider"]
    for graph in GRAPH_NAMES:
        inputs = graph_inputs(md, graph, batch=batch, boxes=5)
        got = backend.run(graph, inputs)
        want = _reference_outputs(backend.graph_file(graph), inputs)
        assert set(got) == set(want)
        for name in want:
            assert got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
    return backend


def test_synthetic_graphs_match_plain_session(synthetic):
    backend = _check_matches_plain_session(synthetic, "fp32")
    out = backend.run("decoder", graph_inputs(synthetic, "decoder", batch=2, boxes=5))
    assert out["mask_logits"].shape == (5, 1, 16, 16) and out["iou"].shape == (5, 1)
    assert "cpu fp32" in backend.describe() and "threads=1" in backend.describe()


def test_sessions_are_created_lazily_per_graph(synthetic):
    backend = OrtBackend(synthetic, threads=1)
    assert backend._sessions == {}
    backend.run("encoder", graph_inputs(synthetic, "encoder"))
    assert list(backend._sessions) == ["encoder"]
    backend.load()
    assert set(backend._sessions) == set(GRAPH_NAMES)
    backend.close()
    assert backend._sessions == {}


def test_windowed_decoder_calls_run_side_by_side_on_the_cpu(synthetic):
    """Two threads: two windowed-decoder calls at once, one thread each; other graphs one call
    on both threads."""
    two, one = OrtBackend(synthetic, threads=2), OrtBackend(synthetic, threads=1)
    assert two.concurrent_runs("decoder_window") == 2 and two.concurrent_runs("decoder") == 1
    assert one.concurrent_runs("decoder_window") == 1
    assert two._session_options("decoder_window").intra_op_num_threads == 1
    assert two._session_options("encoder").intra_op_num_threads == 2
    many = OrtBackend(synthetic, threads=16)
    assert many.concurrent_runs("decoder_window") == ort_backend.MAX_CONCURRENT_RUNS == 4
    assert many._session_options("decoder_window").intra_op_num_threads == 4


def test_cpu_decoder_chunk_default(synthetic):
    """On the CPU the decoder runs a few boxes per call unless the caller says otherwise."""
    from cellsam_rt.pipeline.segmenter import Segmenter

    backend = OrtBackend(synthetic, threads=1)
    assert backend.decoder_chunk_size == ort_backend.CPU_DECODER_CHUNK == 4
    assert Segmenter(synthetic, backend=backend).chunk_size == 4
    assert Segmenter(synthetic, backend=backend, chunk_size=16).chunk_size == 16


def _add_layernorm_model() -> bytes:
    """x + y -> LayerNormalization over [N, 16, 8]: what ONNX Runtime fuses to SkipLayerNorm."""
    from onnx import TensorProto, helper, numpy_helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 16, 8]) for n in ("x", "y", "out")]
    weights = [numpy_helper.from_array(np.ones(8, np.float32), "w"),
               numpy_helper.from_array(np.zeros(8, np.float32), "b")]
    nodes = [helper.make_node("Add", ["x", "y"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "w", "b"], ["out"], axis=-1)]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:2], io[2:], weights),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def test_cpu_sessions_keep_add_and_layernorm_apart(synthetic, tmp_path):
    """ONNX Runtime's CPU SkipLayerNormalization is ~5x slower than Add + LayerNormalization, so
    the CPU backend disables that fusion (and the name it passes is one ORT knows)."""
    import onnx

    backend = OrtBackend(synthetic, threads=1)
    assert backend._disabled_optimizers() == ["SkipLayerNormFusion"]
    ops = {}
    for disabled in ([], backend._disabled_optimizers()):
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"opt{len(disabled)}.onnx")
        ort.InferenceSession(_add_layernorm_model(), opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
        ops[len(disabled)] = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    assert "SkipLayerNormalization" in ops[0]  # the fusion exists ...
    assert "SkipLayerNormalization" not in ops[1] and "LayerNormalization" in ops[1]  # ... and is off
    backend.run("decoder", graph_inputs(synthetic, "decoder"))  # sessions load with it


def _config_entry(opts, key: str) -> str:
    """A session config entry, "" when unset (onnxruntime raises for unset keys)."""
    try:
        return opts.get_session_config_entry(key)
    except RuntimeError:
        return ""


@pytest.mark.parametrize("mode, arenas, shared", [
    ("shared", {"encoder": True, "cellfinder": True, "decoder": True}, "1"),
    ("per-graph", {"encoder": True, "cellfinder": True, "decoder": True}, ""),
    ("decoder", {"encoder": False, "cellfinder": False, "decoder": True}, ""),
    ("off", {"encoder": False, "cellfinder": False, "decoder": False}, ""),
])
def test_arena_modes(synthetic, mode, arenas, shared):
    backend = OrtBackend(synthetic, threads=1, arena=mode)
    for graph, on in arenas.items():
        opts = backend._session_options(graph)
        assert opts.enable_cpu_mem_arena is on
        assert _config_entry(opts, "session.use_env_allocators") == shared
    out = backend.run("decoder", graph_inputs(synthetic, "decoder"))  # sessions work in every mode
    assert out["mask_logits"].shape[0] == graph_inputs(synthetic, "decoder")["boxes"].shape[0]
    assert f"arena={mode}" in backend.describe()
    with pytest.raises(BackendError, match="arena mode"):
        OrtBackend(synthetic, arena="sometimes")


def test_input_errors_name_the_graph(synthetic):
    backend = OrtBackend(synthetic, threads=1)
    inputs = graph_inputs(synthetic, "decoder")
    with pytest.raises(BackendError, match=r"decoder graph takes inputs .*missing \['box_image'\]"):
        backend.run("decoder", {k: v for k, v in inputs.items() if k != "box_image"})
    with pytest.raises(BackendError, match=r"unexpected \['extra'\]"):
        backend.run("decoder", {**inputs, "extra": inputs["boxes"]})
    with pytest.raises(BackendError, match="encoder graph failed on cpu"):
        backend.run("encoder", {"image": np.zeros((1, 3, 64, 64), np.float64)})
    with pytest.raises(BackendError, match="unknown graph"):
        backend.run("prompt_encoder", {})


def test_bad_requests(synthetic, tmp_path):
    only32 = make_synthetic_model_dir(tmp_path / "m32", precisions=("fp32",))
    with pytest.raises(BackendError, match=r"no fp16 graphs \(available: fp32\)"):
        create_backend(only32, "cpu", precision="fp16")
    with pytest.raises(BackendError, match="unknown backend 'gpu'"):
        create_backend(synthetic, "gpu")
    with pytest.raises(BackendError, match="unknown precision"):
        create_backend(synthetic, "cpu", precision="int4")
    with pytest.raises(BackendError, match="int8 graphs run on the cpu backend only"):
        create_backend(synthetic, "cuda", precision="int8")
    with pytest.raises(BackendError, match="threads must be >= 1"):
        create_backend(synthetic, "cpu", threads=0)
    (tmp_path / "junk").mkdir()
    junk = make_synthetic_model_dir(tmp_path / "junk")
    (junk / "encoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(BackendError, match=r"encoder.onnx: onnxruntime cannot load"):
        OrtBackend(junk).run("encoder", graph_inputs(junk, "encoder"))


def test_precision_picks_the_graph_files(tmp_path):
    model = make_synthetic_model_dir(tmp_path / "m", precisions=("fp32", "int8"))
    backend = create_backend(model, "cpu", precision="int8", threads=1)
    backend.load(["encoder"])
    assert backend.session("encoder")._model_path.endswith("encoder.int8.onnx")
    assert backend.run("encoder", graph_inputs(model, "encoder"))["embeddings"].shape == (1, 8, 4, 4)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA; the refusal needs a CPU-only build")
def test_cuda_request_without_cuda_is_an_error(synthetic):
    with pytest.raises(BackendError, match=r"backend cuda requested but .* no CUDAExecutionProvider"):
        create_backend(synthetic, "cuda")


@pytest.mark.skipif(HAS_TRT_EP, reason="this onnxruntime has the TensorRT EP")
def test_tensorrt_ep_request_without_it_is_an_error(synthetic):
    with pytest.raises(BackendError, match="no TensorrtExecutionProvider"):
        create_backend(synthetic, "tensorrt-ep")


@pytest.mark.skipif(HAS_TENSORRT, reason="the tensorrt package is installed")
def test_native_tensorrt_without_the_package_is_an_error(synthetic):
    with pytest.raises(BackendError, match="native TensorRT backend needs the tensorrt package"):
        create_backend(synthetic, "tensorrt")
    assert "tensorrt" in BACKENDS


@pytest.mark.skipif(HAS_CUDA, reason="needs a build where the CUDA provider really is absent")
@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_silent_ort_fallback_is_detected(synthetic, monkeypatch):
    """Pretend the build lists CUDA (as onnxruntime-gpu does even when CUDA libraries are
    missing); onnxruntime itself then falls back to the CPU, which must not go unnoticed."""
    monkeypatch.setattr(ort_backend, "available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    backend = create_backend(synthetic, "cuda", threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime's own warning about the provider
        with pytest.raises(BackendError, match=r"encoder graph: onnxruntime fell back to "
                                               r"CPUExecutionProvider although CUDAExecution"):
            backend.run("encoder", graph_inputs(synthetic, "encoder"))

    lenient = OrtBackend(synthetic, device="cuda", threads=1, require_device=False)
    with pytest.warns(RuntimeWarning, match="fell back"):
        out = lenient.run("encoder", graph_inputs(synthetic, "encoder"))
    assert out["embeddings"].shape == (1, 8, 4, 4)


@pytest.mark.skipif(HAS_CUDA, reason="needs a CPU-only onnxruntime")
def test_lenient_request_runs_on_cpu_with_a_warning(synthetic):
    with pytest.warns(RuntimeWarning, match="running on CPU"):
        backend = OrtBackend(synthetic, device="cuda", require_device=False, threads=1)
    assert backend.name == "cpu" and backend.providers == ["CPUExecutionProvider"]
    assert backend.decoder_chunk_size == ort_backend.CPU_DECODER_CHUNK


def test_tensorrt_ep_profiles_follow_the_manifest(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(ort_backend, "available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    backend = OrtBackend(synthetic, device="tensorrt", precision="fp16",
                         trt_engine_cache_dir=tmp_path / "cache", trt_batch=(1, 2, 8),
                         trt_tiles=4, trt_boxes=(1, 64, 512))
    trt, cuda, cpu = backend._providers_for("decoder")
    opts = trt[1]
    assert trt[0] == "TensorrtExecutionProvider" and cuda[0] == "CUDAExecutionProvider"
    assert opts["trt_fp16_enable"] is True
    assert opts["trt_profile_min_shapes"] == "embeddings:1x8x4x4,boxes:1x4,box_image:1"
    assert opts["trt_profile_opt_shapes"] == "embeddings:4x8x4x4,boxes:64x4,box_image:64"
    assert opts["trt_profile_max_shapes"] == "embeddings:4x8x4x4,boxes:512x4,box_image:512"
    enc = backend._providers_for("encoder")[0][1]
    assert enc["trt_profile_max_shapes"] == "image:8x3x64x64"
    assert (tmp_path / "cache" / "fp16").is_dir()
    with pytest.raises(BackendError, match="min <= opt <= max"):
        OrtBackend(synthetic, device="tensorrt", trt_boxes=(8, 4, 16))


# -- the exporter's tiny model ------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tiny_model_matches_plain_session(tiny_model_dir, precision):
    _check_matches_plain_session(tiny_model_dir, precision, batch=1)


# -- GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDAExecutionProvider in this onnxruntime "
                                         "(needs onnxruntime-gpu and an NVIDIA GPU)")
def test_cuda_matches_cpu(tiny_model_dir):
    cpu = create_backend(tiny_model_dir, "cpu", threads=1)
    gpu = create_backend(tiny_model_dir, "cuda")
    for graph in GRAPH_NAMES:
        inputs = graph_inputs(tiny_model_dir, graph, batch=2, boxes=5)
        got, want = gpu.run(graph, inputs), cpu.run(graph, inputs)
        assert "CUDAExecutionProvider" in gpu.providers
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT_EP, reason="no TensorrtExecutionProvider in this onnxruntime")
def test_tensorrt_ep_matches_cpu(tiny_model_dir, tmp_path):
    cpu = create_backend(tiny_model_dir, "cpu", threads=1)
    trt = create_backend(tiny_model_dir, "tensorrt-ep", trt_engine_cache_dir=tmp_path)
    for graph in GRAPH_NAMES:
        inputs = graph_inputs(tiny_model_dir, graph, batch=1, boxes=5)
        got, want = trt.run(graph, inputs), cpu.run(graph, inputs)
        assert "TensorrtExecutionProvider" in trt.providers
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-2, atol=1e-2)
