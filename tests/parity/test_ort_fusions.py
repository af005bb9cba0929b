"""ONNX Runtime CPU graphs (export/cellsam_export/ort_fusions.py): same model, one
com.microsoft.MultiHeadAttention node per attention and a BiasGelu per ViT MLP, parity with
PyTorch and with the plain graphs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from cellsam_export.build import build_cellsam  # noqa: E402
from cellsam_export.checkpoint import random_state_dict  # noqa: E402
from cellsam_export.modeling.anchor_detr import QueryAttention  # noqa: E402
from cellsam_export.onnx_export import ExportError, export_cellfinder  # noqa: E402
from cellsam_export.ort_fusions import fused_attention  # noqa: E402
from segment_anything.modeling.common import MLPBlock  # noqa: E402
from cellsam_rt.backends import create_backend  # noqa: E402
from cellsam_rt.model_dir import ModelDir, ModelDirError  # noqa: E402

from segment_anything.modeling.image_encoder import Attention  # noqa: E402

FP32_TOL = 1e-4  # relative L2, as for every other export (measured ~1e-7 here)


def rel_err(got, ref) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref))


def session(path: Path) -> "ort.InferenceSession":
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny():
    model = build_cellsam("tiny")
    model.load_state_dict(random_state_dict("tiny", with_model_cp=False, seed=0))
    return model.eval()


@pytest.mark.parametrize("size, use_rel_pos", [((5, 7), True), ((6, 6), False)])
def test_fused_vit_attention_equals_sam_attention(size, use_rel_pos):
    """Augmented q/k reproduce scale * q k^T + decomposed rel-pos exactly (non-square grid too)."""
    torch.manual_seed(0)
    attn = Attention(48, num_heads=3, use_rel_pos=use_rel_pos, input_size=size).eval()
    if use_rel_pos:  # SAM zero-initialises them; random values make the test meaningful
        torch.nn.init.normal_(attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
    x = torch.randn(2, *size, 48)
    with torch.no_grad():
        ref = attn(x)
        with fused_attention(attn) as n:
            got = attn(x)
        after = attn(x)
    assert n == 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, ref)  # the patch is undone on exit


def test_fused_mlp_equals_sam_mlp():
    torch.manual_seed(2)
    mlp = MLPBlock(24, 96).eval()  # SAM's ViT MLP: GELU (erf)
    relu = MLPBlock(24, 96, act=torch.nn.ReLU).eval()  # the mask decoder's: left alone
    x = torch.randn(2, 5, 5, 24)
    with torch.no_grad():
        ref = mlp(x)
        with fused_attention(torch.nn.ModuleList([mlp, relu])) as n:
            got = mlp(x)
            assert "forward" not in vars(relu)
    assert n == 0  # counts attention modules only
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_fused_query_attention_equals_plain():
    torch.manual_seed(1)
    attn = QueryAttention(32, 4).eval()
    q, k = torch.randn(2, 11, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        ref = attn(q, k, k + 1)
        with fused_attention(attn):
            got = attn(q, k, k + 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _mha_count(path: Path, op: str = "MultiHeadAttention") -> int:
    return sum(n.op_type == op and n.domain == "com.microsoft"
               for n in onnx.load(str(path)).graph.node)


def test_tiny_model_dir_has_cpu_graphs(tiny_model_dir: Path, tiny):
    """The exported CPU trunks: one MHA node per attention module, parity with PyTorch at B=1, 3."""
    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())
    assert manifest["cpu_graphs"] == {"fp32": {"encoder": "encoder.cpu.onnx",
                                               "cellfinder": "cellfinder.cpu.onnx"}}
    n_enc = sum(isinstance(m, Attention) for m in tiny.sam.image_encoder.modules())
    n_cf = sum(isinstance(m, (Attention, QueryAttention)) for m in tiny.cellfinder.modules())
    assert _mha_count(tiny_model_dir / "encoder.cpu.onnx") == n_enc > 0
    assert _mha_count(tiny_model_dir / "cellfinder.cpu.onnx") == n_cf > n_enc
    n_mlp = sum(type(m) is MLPBlock for m in tiny.sam.image_encoder.modules())
    assert _mha_count(tiny_model_dir / "encoder.cpu.onnx", "BiasGelu") == n_mlp > 0
    assert _mha_count(tiny_model_dir / "encoder.onnx") == 0  # the portable graphs stay plain
    assert _mha_count(tiny_model_dir / "encoder.onnx", "BiasGelu") == 0
    gen = torch.Generator().manual_seed(3)
    enc, cf = session(tiny_model_dir / "encoder.cpu.onnx"), session(tiny_model_dir / "cellfinder.cpu.onnx")
    for b in (1, 3):
        x = torch.randn(b, 3, 256, 256, generator=gen)
        with torch.no_grad():
            ref = tiny.sam.image_encoder(x).numpy()
            ref_logits, ref_boxes = (t.numpy() for t in tiny.cellfinder(x))
        assert rel_err(enc.run(None, {"image": x.numpy()})[0], ref) <= FP32_TOL
        logits, boxes = cf.run(None, {"image": x.numpy()})
        assert logits.shape == ref_logits.shape
        assert rel_err(logits, ref_logits) <= FP32_TOL and rel_err(boxes, ref_boxes) <= FP32_TOL


@pytest.mark.slow  # the full 3500-query head: half a minute or more on 2 cores
def test_full_head_cellfinder_cpu_graph(tmp_path: Path):
    """3500 queries attend to each other in the Anchor-DETR decoder: fused too, parity holds."""
    model = build_cellsam("full_head")
    model.load_state_dict(random_state_dict("full_head", with_model_cp=False, seed=1))
    model.eval()
    path = export_cellfinder(model.cellfinder, tmp_path / "cf.cpu.onnx", fused_attention=True)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_logits, ref_boxes = (t.numpy() for t in model.cellfinder(x))
    logits, boxes = session(path).run(None, {"image": x.numpy()})
    assert logits.shape == (1, 3500, 2)
    assert rel_err(logits, ref_logits) <= FP32_TOL and rel_err(boxes, ref_boxes) <= FP32_TOL


def test_fusing_a_graph_without_vit_attention_is_an_error(tmp_path: Path):
    class ConvDetector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 16, 16)

        def forward(self, x):
            y = self.conv(x).flatten(2).transpose(1, 2)
            return y[..., :2], y[..., 2:].sigmoid()

    with pytest.raises(ExportError, match="no attention to fuse"):
        export_cellfinder(ConvDetector(), tmp_path / "d.onnx", image_size=64, fused_attention=True)
    assert not (tmp_path / "d.onnx").exists()


def test_backend_runs_cpu_graphs_unless_told_not_to(tiny_model_dir: Path):
    md = ModelDir.load(tiny_model_dir)
    fused = create_backend(md, "cpu", threads=1)
    plain = create_backend(md, "cpu", threads=1, fused_attention=False)
    assert fused.graph_file("encoder").name == "encoder.cpu.onnx"
    assert fused.graph_file("decoder").name == "decoder.onnx"  # no CPU variant: the plain one
    assert plain.graph_file("encoder").name == "encoder.onnx"
    assert "fused-attention=encoder,cellfinder" in fused.describe()
    assert "fused-attention" not in plain.describe()
    assert create_backend(md, "cpu", precision="fp16").graph_file("encoder").name == "encoder.fp16.onnx"
    x = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
    a = fused.run("encoder", {"image": x})["embeddings"]
    b = plain.run("encoder", {"image": x})["embeddings"]
    assert rel_err(a, b) <= FP32_TOL


def test_quantize_starts_from_the_cpu_graphs(tiny_model_dir: Path, tmp_path: Path):
    pytest.importorskip("onnxruntime.quantization")
    from cellsam_rt.tools.quantize import quantize_model_dir

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    quantize_model_dir(model)
    q = json.loads((model / "manifest.json").read_text())["quantization"]
    assert q["sources"] == {"encoder": "encoder.cpu.onnx", "cellfinder": "cellfinder.cpu.onnx"}
    assert _mha_count(model / "encoder.int8.onnx") > 0
    # Linear layers go INT8; the relative-position table products (3-D constants) stay FP32.
    from cellsam_rt.tools.quantize import _position_table_products

    tables = _position_table_products(model / "encoder.cpu.onnx")
    assert len(tables) == 2 * _mha_count(model / "encoder.cpu.onnx")  # rel_h and rel_w per block
    kept = {n.name for n in onnx.load(str(model / "encoder.int8.onnx")).graph.node if n.op_type == "MatMul"}
    assert set(tables) <= kept
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(model / "encoder.int8.onnx")).graph.node)


@pytest.mark.parametrize("change, expect", [
    (lambda m: m.update(cpu_graphs=[]), "cpu_graphs must map a precision"),
    (lambda m: m.update(cpu_graphs={"int8": {}}), "precision 'int8' has no entry in graphs"),
    (lambda m: m["cpu_graphs"]["fp32"].update(trunk="encoder.cpu.onnx"), "unknown graph 'trunk'"),
    (lambda m: m["cpu_graphs"]["fp32"].update(encoder="../e.onnx"), "inside the model directory"),
    (lambda m: m["cpu_graphs"]["fp32"].update(encoder="gone.onnx"),
     r"gone.onnx: missing \(fp32 encoder CPU graph"),
])
def test_cpu_graphs_manifest_errors(tiny_model_dir: Path, tmp_path: Path, change, expect):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    path = model / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match=expect):
        ModelDir.load(model)
