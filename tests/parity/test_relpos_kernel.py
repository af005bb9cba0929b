"""cellsam-rt's own attention kernel (runtime/cellsam_rt/kernels): com.cellsam.RelPosAttention in
ONNX Runtime against a float64 reference, its export from SAM's attention, and how the CPU
backend uses graphs that call it (or runs the plain graphs where it cannot)."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from cellsam_rt import kernels as ops  # noqa: E402
from cellsam_rt.backends import create_backend  # noqa: E402
from cellsam_rt.model_dir import ModelDir, ModelDirError  # noqa: E402

FP32_TOL = 1e-4  # relative L2, as for every other export


def _library_or_skip() -> None:
    """CI sets CELLSAM_RT_REQUIRE_KERNELS=1: there a missing library fails instead of skipping."""
    if ops.library_path() is None:
        if os.environ.get("CELLSAM_RT_REQUIRE_KERNELS") == "1":
            pytest.fail(ops.status()[1])
        pytest.skip(ops.status()[1])


def rel_err(got, ref) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref))


def attention_graph(heads: int) -> bytes:
    t = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    node = helper.make_node("RelPosAttention", ["q", "k", "v", "rel_h", "rel_w"], ["out"],
                            domain=ops.DOMAIN)
    graph = helper.make_graph(
        [node], "relpos", [t("q", ["B", "S", "E"]), t("k", ["B", "S", "E"]), t("v", ["B", "S", "E"]),
                           t("rel_h", ["B", "S", heads, "H"]), t("rel_w", ["B", "S", heads, "W"])],
        [t("out", ["B", "S", "E"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(ops.DOMAIN, 1)])
    return model.SerializeToString()


def session(model, threads: int = 2) -> "ort.InferenceSession":
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    ops.register(opts)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])


def reference(q, k, v, rel_h, rel_w):
    """The attention of SAM's global blocks, in float64 with materialised scores."""
    b, s, heads, h = rel_h.shape
    w = rel_w.shape[-1]
    split = lambda x: x.reshape(b, s, heads, -1).transpose(0, 2, 1, 3).astype(np.float64)  # noqa: E731
    scores = (split(q) @ split(k).transpose(0, 1, 3, 2)).reshape(b, heads, s, h, w)
    scores += rel_h.transpose(0, 2, 1, 3)[..., :, None] + rel_w.transpose(0, 2, 1, 3)[..., None, :]
    scores = scores.reshape(b, heads, s, s)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, s, -1)


def inputs(b, heads, d, h, w, seed=0):
    rng = np.random.default_rng(seed)
    s = h * w
    q, k, v = (rng.standard_normal((b, s, heads * d), dtype=np.float32) for _ in range(3))
    rel_h = rng.standard_normal((b, s, heads, h), dtype=np.float32)
    rel_w = rng.standard_normal((b, s, heads, w), dtype=np.float32)
    return dict(q=(q / np.sqrt(d)).astype(np.float32), k=k, v=v, rel_h=rel_h, rel_w=rel_w)


@pytest.mark.parametrize("isa", ["best", "avx2", "portable"])
@pytest.mark.parametrize("b, heads, d, h, w", [
    (1, 2, 64, 8, 8),     # AVX-512 path, one tile
    (2, 3, 64, 13, 11),   # rows and panels with remainders, W not a multiple of 16, batch 2
    (1, 2, 32, 12, 9),    # two vectors per V row
    (1, 4, 16, 20, 20),   # one vector per V row, several tiles per head
    (2, 3, 64, 5, 64),    # W a multiple of 32: relative terms added in the q.k epilogue
    (1, 2, 32, 3, 32),
    (1, 2, 24, 6, 5),     # head size not a multiple of 16: always the portable path
])
def test_kernel_matches_reference(b, heads, d, h, w, isa, monkeypatch):
    """Every instruction-set path ($CELLSAM_RT_KERNEL_ISA caps the best one) against float64."""
    _library_or_skip()
    if isa != "best":
        monkeypatch.setenv("CELLSAM_RT_KERNEL_ISA", isa)
    feed = inputs(b, heads, d, h, w)
    out = session(attention_graph(heads)).run(None, feed)[0]
    assert out.shape == feed["v"].shape
    ref = reference(**feed)
    assert rel_err(out, ref) <= 1e-6
    assert np.abs(out - ref).max() <= 1e-5
    single = session(attention_graph(heads), threads=1).run(None, feed)[0]
    np.testing.assert_array_equal(single, out)  # the work split does not change any sum


def test_kernel_rejects_inconsistent_shapes():
    _library_or_skip()
    feed = inputs(1, 2, 16, 4, 5)
    sess = session(attention_graph(2))
    with pytest.raises(Exception, match="tokens S must equal H \\* W"):
        sess.run(None, dict(feed, rel_h=np.ascontiguousarray(feed["rel_h"][..., :3])))
    bad = inputs(1, 2, 16, 4, 5)
    bad["v"] = bad["v"][:, :, :16].copy()
    with pytest.raises(Exception, match="query, key and value must be"):
        sess.run(None, bad)


def test_abi_check_against_the_installed_onnxruntime():
    """The library's declared C ABI is checked against this process's ONNX Runtime: the API
    version is served and the status slots round-trip."""
    _library_or_skip()
    ok, why = ops.abi_check(ops.library_path())
    assert ok and f"onnxruntime {ort.__version__}" in why and "checked" in why


def test_abi_check_refuses_an_api_version_onnxruntime_does_not_serve():
    _library_or_skip()
    ok, why = ops.abi_check(ops.library_path(), api_version=10_000)
    assert not ok and "does not serve C API version 10000" in why


def test_abi_check_refuses_a_second_onnxruntime(monkeypatch):
    """The shared library found must be the one the Python package is: otherwise say so."""
    _library_or_skip()
    monkeypatch.setattr(ort, "__version__", "1.0.0")
    ok, why = ops.abi_check(ops.library_path())
    assert not ok and "two ONNX Runtimes" in why
    ops.status.cache_clear()
    try:
        assert ops.status() == (False, why)  # so the backend runs the plain graphs, and says why
    finally:
        monkeypatch.undo()
        ops.status.cache_clear()


def test_status_names_the_reason(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(ops, "_HERE", tmp_path)
    ops.status.cache_clear()
    try:
        usable, why = ops.status()
        assert not usable and str(tmp_path) in why and "not built" in why
        with pytest.raises(RuntimeError, match="not built"):
            ops.register(ort.SessionOptions())
    finally:
        ops.status.cache_clear()
    assert ops.missing(["com.cellsam.RelPosAttention", "com.cellsam.Other"]) == ["com.cellsam.Other"]


# -- export: SAM's global attention -> RelPosAttention ---------------------------------------

torch = pytest.importorskip("torch")


@pytest.fixture()
def kernel_everywhere(monkeypatch):
    """The tiny model's blocks are far below the full model's 64x64 tokens: route every
    relative-position attention to the kernel so that the export path is exercised."""
    from cellsam_export import ort_fusions

    monkeypatch.setattr(ort_fusions, "RELPOS_MIN_TOKENS", 0)


@pytest.mark.parametrize("size", [(5, 7), (8, 8)])
def test_torch_op_equals_sam_attention(size, kernel_everywhere, monkeypatch):
    from cellsam_export import ort_fusions
    from cellsam_export.ort_fusions import fused_attention
    from segment_anything.modeling.image_encoder import Attention

    calls = []
    real = ort_fusions.relpos_attention
    monkeypatch.setattr(ort_fusions, "relpos_attention", lambda *a: calls.append(1) or real(*a))

    torch.manual_seed(0)
    attn = Attention(48, num_heads=3, use_rel_pos=True, input_size=size).eval()
    torch.nn.init.normal_(attn.rel_pos_h, std=0.5)
    torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
    x = torch.randn(2, *size, 48)
    with torch.no_grad():
        ref = attn(x)
        with fused_attention(attn, relpos_kernel=True):
            got = attn(x)
        assert len(calls) == 1
        with fused_attention(attn, relpos_kernel=False):
            mha = attn(x)
        assert len(calls) == 1  # MultiHeadAttention instead
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mha, ref, rtol=1e-5, atol=1e-6)
    assert not hasattr(attn, "_cellsam_relpos_kernel")  # undone on exit


@pytest.fixture(scope="module")
def kernel_model_dir(tmp_path_factory) -> Path:
    """A tiny model directory whose CPU trunks call RelPosAttention in every attention block."""
    from cellsam_export import ort_fusions
    from cellsam_export.build import build_cellsam
    from cellsam_export.checkpoint import random_state_dict
    from cellsam_export.onnx_export import export_model_dir

    model = build_cellsam("tiny")
    model.load_state_dict(random_state_dict("tiny", with_model_cp=False, seed=0))
    saved = ort_fusions.RELPOS_MIN_TOKENS
    ort_fusions.RELPOS_MIN_TOKENS = 0
    try:
        out = tmp_path_factory.mktemp("kernel") / "model"
        export_model_dir((model.eval(), {"config_name": "tiny", "random_seed": 0}), out,
                         fp16=False, progress=None)
    finally:
        ort_fusions.RELPOS_MIN_TOKENS = saved
    return out


def _count(path: Path, op: str, domain: str) -> int:
    import onnx

    return sum(n.op_type == op and n.domain == domain for n in onnx.load(str(path)).graph.node)


def test_model_dir_records_and_runs_the_kernel(kernel_model_dir: Path):
    _library_or_skip()
    from cellsam_export.build import build_cellsam
    from cellsam_export.checkpoint import random_state_dict
    from segment_anything.modeling.image_encoder import Attention

    manifest = json.loads((kernel_model_dir / "manifest.json").read_text())
    assert manifest["cpu_custom_ops"] == ["com.cellsam.RelPosAttention"]
    model = build_cellsam("tiny")
    model.load_state_dict(random_state_dict("tiny", with_model_cp=False, seed=0))
    model.eval()
    n_enc = sum(isinstance(m, Attention) for m in model.sam.image_encoder.modules())
    assert _count(kernel_model_dir / "encoder.cpu.onnx", "RelPosAttention", ops.DOMAIN) == n_enc
    assert _count(kernel_model_dir / "encoder.cpu.onnx", "MultiHeadAttention", "com.microsoft") == 0
    assert _count(kernel_model_dir / "cellfinder.cpu.onnx", "RelPosAttention", ops.DOMAIN) > 0

    backend = create_backend(ModelDir.load(kernel_model_dir), "cpu", threads=2)
    assert backend.graph_file("encoder").name == "encoder.cpu.onnx"
    assert "kernels=RelPosAttention" in backend.describe()
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.sam.image_encoder(x).numpy()
        ref_logits, ref_boxes = (t.numpy() for t in model.cellfinder(x))
    got = backend.run("encoder", {"image": x.numpy()})["embeddings"]
    assert rel_err(got, ref) <= FP32_TOL
    out = backend.run("cellfinder", {"image": x.numpy()})
    assert rel_err(out["class_logits"], ref_logits) <= FP32_TOL
    assert rel_err(out["boxes"], ref_boxes) <= FP32_TOL


def test_backend_runs_plain_graphs_without_the_kernel(kernel_model_dir: Path, monkeypatch):
    monkeypatch.setattr(ops, "status", lambda: (False, "no kernel library in this test"))
    backend = create_backend(ModelDir.load(kernel_model_dir), "cpu", threads=1)
    with pytest.warns(RuntimeWarning, match="RelPosAttention, but no kernel library in this test"):
        assert backend.graph_file("encoder").name == "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per backend
        assert backend.graph_file("cellfinder").name == "cellfinder.onnx"
    x = np.zeros((1, 3, 256, 256), np.float32)
    assert backend.run("encoder", {"image": x})["embeddings"].shape[0] == 1


def test_int8_from_kernel_graphs(kernel_model_dir: Path, tmp_path: Path):
    """Quantising keeps RelPosAttention (FP32) and the INT8 trunks run with the kernel."""
    _library_or_skip()
    pytest.importorskip("onnxruntime.quantization")
    from cellsam_rt.tools.quantize import quantize_model_dir

    model = tmp_path / "m"
    shutil.copytree(kernel_model_dir, model)
    quantize_model_dir(model)
    assert _count(model / "encoder.int8.onnx", "RelPosAttention", ops.DOMAIN) > 0
    md = ModelDir.load(model)
    x = np.random.default_rng(1).standard_normal((1, 3, 256, 256)).astype(np.float32)
    int8 = create_backend(md, "cpu", precision="int8", threads=2).run("encoder", {"image": x})
    fp32 = create_backend(md, "cpu", threads=2).run("encoder", {"image": x})
    assert rel_err(int8["embeddings"], fp32["embeddings"]) <= 0.1  # INT8's usual loss here


def test_int8_from_plain_graphs_where_the_kernel_cannot_run(kernel_model_dir: Path, tmp_path: Path,
                                                            monkeypatch):
    pytest.importorskip("onnxruntime.quantization")
    from cellsam_rt.tools.quantize import quantize_model_dir

    monkeypatch.setattr(ops, "status", lambda: (False, "no kernel library in this test"))
    model = tmp_path / "m"
    shutil.copytree(kernel_model_dir, model)
    said = []
    quantize_model_dir(model, progress=said.append)
    assert any("quantising the plain graphs" in line for line in said)
    q = json.loads((model / "manifest.json").read_text())["quantization"]
    assert q["sources"] == {"encoder": "encoder.onnx", "cellfinder": "cellfinder.onnx"}
    assert _count(model / "encoder.int8.onnx", "RelPosAttention", ops.DOMAIN) == 0
    x = np.zeros((1, 3, 256, 256), np.float32)  # loads and runs without the library
    out = create_backend(ModelDir.load(model), "cpu", precision="int8", threads=1).run(
        "encoder", {"image": x})
    assert np.isfinite(out["embeddings"]).all()


def test_manifest_custom_ops_must_be_names(kernel_model_dir: Path, tmp_path: Path):
    model = tmp_path / "m"
    shutil.copytree(kernel_model_dir, model)
    path = model / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["cpu_custom_ops"] = "com.cellsam.RelPosAttention"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="cpu_custom_ops must be a list"):
        ModelDir.load(model)
