"""`cellsam-rt quantize`: INT8 trunks next to the FP32 graphs, usable with --precision int8."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")  # onnxruntime.quantization needs it

from cellsam_rt.model_dir import ModelDir  # noqa: E402
from cellsam_rt.tools.quantize import QuantizeError, quantize_model_dir  # noqa: E402


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_quantize_writes_int8_entry_and_runs(model_copy):
    from cellsam_rt.backends import create_backend

    entry = quantize_model_dir(model_copy)
    assert entry == {"encoder": "encoder.int8.onnx", "cellfinder": "cellfinder.int8.onnx",
                     "decoder": "decoder.onnx"}
    md = ModelDir.load(model_copy)
    assert "int8" in md.precisions
    assert json.loads(md.manifest_path.read_text())["quantization"]["graphs"] == [
        "encoder", "cellfinder"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, md.image_size, md.image_size)).astype(np.float32)
    ref = create_backend(md, precision="fp32").run("encoder", {"image": x})["embeddings"]
    got = create_backend(md, precision="int8").run("encoder", {"image": x})["embeddings"]
    assert got.shape == ref.shape
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1


def test_quantize_refuses_to_redo_without_force(model_copy):
    quantize_model_dir(model_copy, graphs=["encoder"])
    with pytest.raises(QuantizeError, match="already has int8"):
        quantize_model_dir(model_copy)
    entry = quantize_model_dir(model_copy, graphs=["encoder"], per_channel=False, force=True)
    assert entry["cellfinder"] == "cellfinder.onnx"  # not quantised: stays FP32


def test_quantize_rejects_unknown_graph(model_copy):
    with pytest.raises(QuantizeError, match="graphs must be among"):
        quantize_model_dir(model_copy, graphs=["trunk"])


def test_quantize_cli(model_copy, capsys):
    from cellsam_rt.cli.main import main

    assert main(["quantize", str(model_copy), "--graphs", "encoder", "--per-tensor"]) == 0
    assert "int8" in ModelDir.load(model_copy).precisions
    assert main(["quantize", str(model_copy)]) == 2
    assert "already has int8" in capsys.readouterr().err
