"""Manifest validation: every problem is a ModelDirError naming the file and what is wrong."""
from __future__ import annotations

import json

import pytest

from cellsam_rt import model_dir as md_module
from cellsam_rt.model_dir import ModelDir, ModelDirError, resolve_model

pytest.importorskip("onnx", reason="the synthetic model directory is written with onnx")
from synthetic_model import make_synthetic_model_dir  # noqa: E402


@pytest.fixture()
def model(tmp_path):
    return make_synthetic_model_dir(tmp_path / "m", precisions=("fp32", "fp16"))


def _edit(model, change):
    path = model / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))
    return path


def test_accessors(model):
    md = ModelDir.load(model)
    assert md.name == "synthetic"
    assert md.image_size == 64 and md.embedding_shape == (8, 4, 4) and md.mask_size == 16
    assert md.num_queries == 16 and not md.has_model_cp and md.preprocessing_mode == "cellsam"
    assert md.precisions == ("fp32", "fp16")
    assert md.graph_path("decoder", "fp16") == model / "decoder.fp16.onnx"
    assert md.thresholds["bbox_threshold"] == 0.4
    assert ModelDir.load(model / "manifest.json").path == model  # the manifest itself works too
    assert resolve_model(str(model)).path == model and resolve_model(md) is md


def test_thresholds_default_when_absent(model):
    _edit(model, lambda m: m.pop("thresholds"))
    assert ModelDir.load(model).thresholds == md_module.DEFAULT_THRESHOLDS


def test_optional_graphs_and_keys(model):
    md = ModelDir.load(model)
    assert not md.has_graph("decoder_window") and md.decoder_window is None
    assert md.object_diameter is None
    with pytest.raises(ModelDirError, match="no fp32 decoder_window graph"):
        md.graph_path("decoder_window")

    def add(m):
        m["graphs"]["fp32"]["decoder_window"] = "decoder.onnx"
        m["decoder_window"] = {"min": 2, "max": 4, "box_factor": 3.5}
        m["object_diameter"] = 12
    _edit(model, add)
    md = ModelDir.load(model)
    assert md.has_graph("decoder_window") and not md.has_graph("decoder_window", "fp16")
    assert md.decoder_window == {"min": 2, "max": 4, "box_factor": 3.5}
    assert md.object_diameter == 12.0
    assert md.graph_path("decoder_window") == model / "decoder.onnx"


def test_graph_path_errors(model):
    _edit(model, lambda m: m["graphs"].pop("fp16"))
    md = ModelDir.load(model)
    with pytest.raises(ModelDirError, match=r"manifest.json: no fp16 graphs.*available: fp32"):
        md.graph_path("encoder", "fp16")
    with pytest.raises(ModelDirError, match="unknown graph 'prompt'"):
        md.graph_path("prompt")


@pytest.mark.parametrize("change, expect", [
    (lambda m: m.pop("format_version"), "missing field 'format_version'"),
    (lambda m: m.update(format_version=2), "newer than this cellsam-rt"),
    (lambda m: m.update(format_version=0), "unsupported format_version 0"),
    (lambda m: m.update(format_version="1"), "format_version must be an integer"),
    (lambda m: [m.pop("image_size"), m.pop("graphs")], "missing fields 'image_size', 'graphs'"),
    (lambda m: m.update(image_size=-64), "image_size must be a positive integer"),
    (lambda m: m.update(embedding_shape=[8, 4]), "embedding_shape must be 3 positive integers"),
    (lambda m: m.update(embedding_shape=[8, 4, 5]), "not square"),
    (lambda m: m.update(embedding_shape=[8, 5, 5], mask_size=20), "not a multiple"),
    (lambda m: m.update(mask_size=32), "mask_size must be 4x the embedding side"),
    (lambda m: m.update(num_queries=0), "num_queries must be a positive integer"),
    (lambda m: m.update(preprocessing="cellsam"), "preprocessing must be an object"),
    (lambda m: m["preprocessing"].update(has_model_cp="yes"), "has_model_cp must be true or false"),
    (lambda m: m["thresholds"].update(bbox_threshold=1.5), r"bbox_threshold must lie in \[0, 1\]"),
    (lambda m: m["thresholds"].update(min_size="25"), "min_size must be a number"),
    (lambda m: m.update(graphs={}), "graphs must map a precision"),
    (lambda m: m["graphs"].update(int4=m["graphs"]["fp32"]), "unknown precision 'int4'"),
    (lambda m: m["graphs"]["fp32"].pop("decoder"), "graphs.fp32 has no 'decoder' graph"),
    (lambda m: m["graphs"]["fp32"].update(encoder="../x.onnx"), "inside the model directory"),
    (lambda m: m.update(name=""), "name must be a non-empty string"),
    (lambda m: m["graphs"]["fp32"].update(prompt="decoder.onnx"), "unknown graph 'prompt'"),
    (lambda m: m.update(decoder_window={"min": 2, "max": 4, "box_factor": 4}),
     "no precision has a decoder_window graph"),
    (lambda m: [m["graphs"]["fp32"].update(decoder_window="decoder.onnx"),
                m.update(decoder_window={"min": 4, "max": 8, "box_factor": 4})],
     r"decoder_window must be .* 1 <= min <= max <= 4"),
    (lambda m: [m["graphs"]["fp32"].update(decoder_window="decoder.onnx"),
                m.update(decoder_window={"min": 2, "max": 4, "box_factor": 4, "paste_factor": 0})],
     r"decoder_window must be .*paste_factor"),
    (lambda m: m.update(object_diameter=0), "object_diameter must be a number of pixels"),
    (lambda m: m.update(outline="edges"), "outline must be"),
    (lambda m: m.update(denoise="median"), "denoise must be"),
    (lambda m: m.update(augment="auto"), "augment must be"),
])
def test_manifest_errors_name_the_manifest(model, change, expect):
    path = _edit(model, change)
    with pytest.raises(ModelDirError, match=expect) as info:
        ModelDir.load(model)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_and_empty_graph_files_are_named(model):
    (model / "cellfinder.fp16.onnx").unlink()
    with pytest.raises(ModelDirError, match=r"cellfinder.fp16.onnx: missing \(fp16 cellfinder"):
        ModelDir.load(model)
    (model / "cellfinder.fp16.onnx").write_bytes(b"")
    with pytest.raises(ModelDirError, match=r"cellfinder.fp16.onnx: empty file"):
        ModelDir.load(model)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        ModelDir.load(tmp_path / "nowhere")
    with pytest.raises(ModelDirError, match=r"manifest.json: missing"):
        ModelDir.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelDirError, match=r"manifest.json: invalid JSON"):
        ModelDir.load(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ModelDirError, match="JSON object"):
        ModelDir.load(tmp_path)


def test_default_model_missing_says_how_to_export(tmp_path, monkeypatch):
    monkeypatch.setattr(md_module, "DEFAULT_MODEL_DIR", tmp_path / "models" / "default")
    for spec in ("default", None):
        with pytest.raises(ModelDirError, match=r"default model is not installed.*cellsam-rt export"):
            resolve_model(spec)


def test_default_model_resolves_when_present(tmp_path, monkeypatch):
    target = make_synthetic_model_dir(tmp_path / "models" / "default")
    monkeypatch.setattr(md_module, "DEFAULT_MODEL_DIR", target)
    assert resolve_model("default").path == target


@pytest.mark.parametrize("key, shipped, absent, other, bad", [
    ("outline", "contrast", "model", "model", "sharp"),
    ("denoise", "off", "off", "gaussian", "median"),
    ("augment", "off", "off", "flips", "rotations"),
])
def test_a_manifest_states_what_auto_means(tmp_path, key, shipped, absent, other, bad):
    """An option at "auto" takes the manifest's mode: the default model's, the mode a manifest
    without the key gets (exported CellSAM), another one stated; a mode given wins."""
    import shutil

    from cellsam_rt.pipeline.segmenter import Segmenter

    assert getattr(resolve_model("default"), key) == shipped
    assert getattr(Segmenter("default", threads=1), key) == shipped
    dst = tmp_path / "m"
    shutil.copytree(resolve_model("default").path, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.pop(key, None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    assert getattr(resolve_model(dst), key) == absent
    (dst / "manifest.json").write_text(json.dumps(dict(manifest, **{key: other})))
    assert getattr(Segmenter(str(dst), threads=1), key) == other
    assert getattr(Segmenter(str(dst), threads=1, **{key: shipped}), key) == shipped
    (dst / "manifest.json").write_text(json.dumps(dict(manifest, **{key: bad})))
    with pytest.raises(ModelDirError, match=f"{key} must be"):
        resolve_model(dst)
    with pytest.raises(ValueError, match=f"{key} must be one of"):
        Segmenter("default", threads=1, **{key: bad})
