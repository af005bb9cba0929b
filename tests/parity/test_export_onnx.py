"""ONNX export: graph parity in ONNX Runtime (CPU) against the PyTorch modules, FP16, model dirs."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from cellsam_export.build import build_cellsam  # noqa: E402
from cellsam_export.checkpoint import random_state_dict, save_checkpoint  # noqa: E402
from cellsam_export.fp16 import convert_to_fp16  # noqa: E402
from cellsam_export import onnx_export  # noqa: E402
from cellsam_rt import kernels as ops  # noqa: E402
from cellsam_export.onnx_export import (  # noqa: E402
    DecoderGraph,
    ExportError,
    export_cellfinder,
    export_model_dir,
)

# FP32 graphs must reproduce PyTorch to float32 rounding; FP16 bounds are ~5x the errors measured
# on these random-weight models (see the test docstrings for the measured figures).
FP32_TOL = 1e-4


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref||, the parity figure used throughout."""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - ref) / np.linalg.norm(ref))


def session(path: Path) -> "ort.InferenceSession":
    """A CPU ONNX Runtime session limited to the CI's two cores."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    if ops.library_path() is not None:  # full-size CPU graphs call cellsam-rt's kernel
        ops.register(opts)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def tiny_model(config: str = "tiny", with_model_cp: bool = False, seed: int = 0):
    """The same random-weight model testing.make_model_dir exports (deterministic in seed)."""
    model = build_cellsam(config, with_model_cp=with_model_cp)
    model.load_state_dict(random_state_dict(config, with_model_cp=with_model_cp, seed=seed))
    return model.eval()


def random_boxes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """xyxy boxes in S-space, a few reaching past the image edge as CellFinder's do."""
    xy = torch.rand(n, 2, generator=gen) * size
    wh = 4 + torch.rand(n, 2, generator=gen) * size / 4
    return torch.cat([xy, xy + wh], dim=1)


def reference_decoder(sam, embeddings: torch.Tensor, boxes: torch.Tensor, box_image: torch.Tensor):
    """What the reference does: prompt encoder + mask decoder, one box at a time, single mask."""
    masks, ious = [], []
    with torch.no_grad():
        dense_pe = sam.prompt_encoder.get_dense_pe()
        for i in range(boxes.shape[0]):
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[i : i + 1], masks=None)
            t = int(box_image[i])
            m, q = sam.mask_decoder(
                image_embeddings=embeddings[t : t + 1],
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            masks.append(m)
            ious.append(q)
    return torch.cat(masks).numpy(), torch.cat(ious).numpy()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Two CI cores are shared with ONNX Runtime; torch gets one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random-weight model behind the shared `tiny_model_dir` fixture."""
    return tiny_model("tiny")


# ---------------------------------------------------------------------------------------------
# Tiny graphs (from the session-wide model directory)
# ---------------------------------------------------------------------------------------------


def test_model_dir_manifest_and_files(tiny_model_dir: Path):
    """The model directory holds exactly the manifest, six single-file graphs and the two CPU
    trunk variants."""
    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["name"] == "cellsam_random_tiny_seed0"  # the checkpoint's file stem
    assert manifest["image_size"] == 256
    assert manifest["embedding_shape"] == [64, 16, 16]
    assert manifest["mask_size"] == 64
    assert manifest["num_queries"] == 50 and manifest["num_classes"] == 2
    assert manifest["preprocessing"] == {"mode": "cellsam", "has_model_cp": False}
    assert manifest["thresholds"] == {"bbox_threshold": 0.4, "iou_threshold": 0.5,
                                      "mask_threshold": 0.4, "min_size": 25}
    assert manifest["opset"] == 18
    assert manifest["source"]["config"] == "tiny"
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["exporter"]["torch"] == torch.__version__.split("+")[0]
    files = {f for prec in manifest["graphs"].values() for f in prec.values()}
    assert files == {f"{g}{p}.onnx" for g in ("encoder", "cellfinder", "decoder") for p in ("", ".fp16")}
    assert manifest["cpu_graphs"] == {"fp32": {g: f"{g}.cpu.onnx" for g in ("encoder", "cellfinder")}}
    files |= set(manifest["cpu_graphs"]["fp32"].values())
    # Nothing else: no external-data side files, no leftovers.
    assert {p.name for p in tiny_model_dir.iterdir()} == files | {"manifest.json"}
    for f in files:
        model = onnx.load(str(tiny_model_dir / f), load_external_data=False)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer), f
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    # The runtime's own validation accepts what we write.
    model_dir = pytest.importorskip("cellsam_rt.model_dir")
    loaded = model_dir.ModelDir.load(tiny_model_dir)
    assert set(loaded.precisions) == {"fp32", "fp16"}


def test_model_dir_with_model_cp(tiny_model_dir_cp: Path):
    """has_model_cp is recorded, and the graphs come from model_cp (the SAM used at inference)."""
    manifest = json.loads((tiny_model_dir_cp / "manifest.json").read_text())
    assert manifest["preprocessing"]["has_model_cp"] is True
    model = tiny_model("tiny", with_model_cp=True)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    got = session(tiny_model_dir_cp / "encoder.onnx").run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref_cp = model.model_cp.image_encoder(x).numpy()
        ref_main = model.model.image_encoder(x).numpy()
    assert rel_err(got, ref_cp) <= FP32_TOL
    assert rel_err(got, ref_main) > 1e-2  # the two SAMs differ, so this tells them apart


def test_graph_io_names_and_types(tiny_model_dir: Path):
    """The runtime relies on these exact names, dtypes and dynamic axes."""
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    expect = {
        "encoder": ([("image", f32, ["B", 3, 256, 256])], [("embeddings", f32, ["B", 64, 16, 16])]),
        "cellfinder": ([("image", f32, ["B", 3, 256, 256])],
                       [("class_logits", f32, ["B", 50, 2]), ("boxes", f32, ["B", 50, 4])]),
        "decoder": ([("embeddings", f32, ["T", 64, 16, 16]), ("boxes", f32, ["N", 4]), ("box_image", i64, ["N"])],
                    [("mask_logits", f32, ["N", 1, 64, 64]), ("iou", f32, ["N", 1])]),
    }

    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    for name, (inputs, outputs) in expect.items():
        for suffix in ("", ".fp16"):
            model = onnx.load(str(tiny_model_dir / f"{name}{suffix}.onnx"))
            assert sig(model.graph.input) == inputs, (name, suffix)
            assert sig(model.graph.output) == outputs, (name, suffix)


def test_encoder_parity_dynamic_batch(tiny_model_dir: Path, tiny):
    """Encoder graph == PyTorch image encoder at B=1 and B=3 (exported with B=2)."""
    gen = torch.Generator().manual_seed(1)
    sess = session(tiny_model_dir / "encoder.onnx")
    sess16 = session(tiny_model_dir / "encoder.fp16.onnx")
    for b in (1, 3):
        x = torch.randn(b, 3, 256, 256, generator=gen)
        with torch.no_grad():
            ref = tiny.sam.image_encoder(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        assert got.shape == (b, 64, 16, 16)
        assert rel_err(got, ref) <= FP32_TOL
        got16 = sess16.run(None, {"image": x.numpy()})[0]
        assert got16.dtype == np.float32
        assert rel_err(got16, ref) <= 3e-3  # measured 3.7e-4


def test_decoder_parity_box_by_box(tiny_model_dir: Path, tiny):
    """Decoder graph == reference per-box loop for N = 1, 7, 257 boxes over T = 2 embeddings."""
    gen = torch.Generator().manual_seed(2)
    sam = tiny.sam
    with torch.no_grad():
        embeddings = sam.image_encoder(torch.randn(2, 3, 256, 256, generator=gen))
    sess = session(tiny_model_dir / "decoder.onnx")
    sess16 = session(tiny_model_dir / "decoder.fp16.onnx")
    for n in (1, 7, 257):
        boxes = random_boxes(n, 256, gen)
        box_image = (torch.rand(n, generator=gen) < 0.5).long()
        if n > 1:
            box_image[0], box_image[1] = 0, 1  # both embeddings are used
        ref_masks, ref_iou = reference_decoder(sam, embeddings, boxes, box_image)
        feeds = {"embeddings": embeddings.numpy(), "boxes": boxes.numpy(), "box_image": box_image.numpy()}
        masks, iou = sess.run(None, feeds)
        assert masks.shape == (n, 1, 64, 64) and iou.shape == (n, 1)
        assert rel_err(masks, ref_masks) <= FP32_TOL
        assert rel_err(iou, ref_iou) <= FP32_TOL
        masks16, iou16 = sess16.run(None, feeds)
        assert masks16.dtype == np.float32 and iou16.dtype == np.float32
        assert rel_err(masks16, ref_masks) <= 5e-3  # measured 6.6e-4 (N=257)
        assert rel_err(iou16, ref_iou) <= 5e-3  # measured 2.1e-4 (N=257)


def test_decoder_graph_matches_reference_in_torch(tiny):
    """DecoderGraph itself (before export) reproduces the reference exactly in PyTorch."""
    gen = torch.Generator().manual_seed(4)
    sam = tiny.sam
    embeddings = torch.randn(3, 64, 16, 16, generator=gen)
    boxes = random_boxes(9, 256, gen)
    box_image = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1])
    with torch.no_grad():
        masks, iou = DecoderGraph(sam)(embeddings, boxes, box_image)
    ref_masks, ref_iou = reference_decoder(sam, embeddings, boxes, box_image)
    assert rel_err(masks.numpy(), ref_masks) <= 1e-5
    assert rel_err(iou.numpy(), ref_iou) <= 1e-5


def test_window_decoder_reads_only_its_window_and_equals_the_decoder_on_the_whole_grid(tiny):
    """WindowDecoderGraph: a whole-grid window is DecoderGraph; tokens outside a window are unread."""
    from cellsam_export.onnx_export import WindowDecoderGraph, window_cells

    gen = torch.Generator().manual_seed(5)
    sam = tiny.sam
    embeddings = torch.randn(2, 64, 16, 16, generator=gen)
    boxes = random_boxes(5, 256, gen)
    box_image = torch.tensor([0, 1, 1, 0, 1])
    graph = WindowDecoderGraph(sam)
    with torch.no_grad():
        full_masks, full_iou = DecoderGraph(sam)(embeddings, boxes, box_image)
        masks, iou = graph(embeddings, boxes, box_image, torch.zeros(5, 2, dtype=torch.int64),
                           window_cells(16, 16))
        assert rel_err(masks.numpy(), full_masks.numpy()) <= 1e-5
        assert rel_err(iou.numpy(), full_iou.numpy()) <= 1e-5
        origin = torch.tensor([[2, 3], [0, 0], [8, 8], [4, 1], [1, 7]])
        small, small_iou = graph(embeddings, boxes, box_image, origin, window_cells(8, 16))
        assert small.shape == (5, 1, 32, 32)
        changed = embeddings.clone()
        for k, (img, (r, c)) in enumerate(zip(box_image.tolist(), origin.tolist())):
            keep = changed[img, :, r:r + 8, c:c + 8].clone()
            changed[img] = torch.randn(changed[img].shape, generator=gen)
            changed[img, :, r:r + 8, c:c + 8] = keep
            again, again_iou = graph(changed, boxes[k:k + 1], box_image[k:k + 1], origin[k:k + 1],
                                     window_cells(8, 16))
            assert torch.equal(again, small[k:k + 1]) or rel_err(again.numpy(), small[k:k + 1].numpy()) <= 1e-6
            changed = embeddings.clone()


def test_window_decoder_pastes_a_block_equal_to_that_part_of_the_window(tiny):
    """paste/paste_cells: the upscaled V x V block is the whole window's logits there."""
    from cellsam_export.onnx_export import WindowDecoderGraph, window_cells

    gen = torch.Generator().manual_seed(6)
    embeddings = torch.randn(2, 64, 16, 16, generator=gen)
    boxes = random_boxes(4, 256, gen)
    box_image = torch.tensor([0, 1, 1, 0])
    origin = torch.tensor([[2, 3], [0, 0], [8, 8], [4, 1]])
    paste = torch.tensor([[0, 0], [3, 2], [4, 4], [1, 0]])
    graph = WindowDecoderGraph(tiny.sam)
    with torch.no_grad():
        whole, iou = graph(embeddings, boxes, box_image, origin, window_cells(8, 16))
        block, block_iou = graph(embeddings, boxes, box_image, origin, window_cells(8, 16), paste,
                                 window_cells(4, 8))
    assert block.shape == (4, 1, 16, 16)
    assert torch.equal(block_iou, iou)
    for k, (r, c) in enumerate(paste.tolist()):
        want = whole[k, :, 4 * r:4 * r + 16, 4 * c:4 * c + 16]
        assert rel_err(block[k].numpy(), want.numpy()) <= 1e-6


def test_decoder_graph_has_no_onehot_or_tile(tiny_model_dir: Path):
    """TensorRT rejects OneHot/Tile (what repeat_interleave lowers to); the decoder gathers instead."""
    for suffix in ("", ".fp16"):
        ops = {n.op_type for n in onnx.load(str(tiny_model_dir / f"decoder{suffix}.onnx")).graph.node}
        assert not ops & {"OneHot", "Tile", "Loop", "Scan", "If"}, ops
        assert "Gather" in ops


def test_decoder_graph_tensors_stay_within_rank_6(tiny_model_dir: Path):
    """GPU runtimes cap tensor rank (TensorRT at 8, some ORT CUDA kernels lower): the token-space
    upscaling's pixel scatter is written 6-D."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_model_dir / "decoder.onnx")))
    ranks = [len(v.type.tensor_type.shape.dim) for v in model.graph.value_info]
    assert ranks and max(ranks) <= 6


def test_fp16_graphs_keep_norms_and_softmax_in_fp32(tiny_model_dir: Path):
    """In FP16 graphs the weights are FP16 but LayerNorm/Softmax/LayerNorm2d compute in FP32."""
    from onnx import TensorProto

    for graph in ("encoder", "cellfinder", "decoder"):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_model_dir / f"{graph}.fp16.onnx")))
        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
        types.update({i.name: i.data_type for i in model.graph.initializer})
        types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
        nodes = list(model.graph.node)
        # By size, nearly all weights are FP16 (norm scales and the like stay FP32).
        sizes = {TensorProto.FLOAT16: 0, TensorProto.FLOAT: 0}
        for init in model.graph.initializer:
            if init.data_type in sizes:
                sizes[init.data_type] += int(np.prod(init.dims)) * (2 if init.data_type == TensorProto.FLOAT16 else 4)
        assert sizes[TensorProto.FLOAT16] > 0.9 * sum(sizes.values()), (graph, sizes)
        guarded = [n for n in nodes if n.op_type in ("LayerNormalization", "Softmax", "Sqrt")]
        assert guarded, graph
        for node in guarded:
            assert types.get(node.input[0]) == TensorProto.FLOAT, (graph, node.name, node.op_type)
        # The matmuls really run in FP16 (otherwise the conversion did nothing useful).
        matmul_types = {types.get(n.input[0]) for n in nodes if n.op_type == "MatMul"}
        assert TensorProto.FLOAT16 in matmul_types, graph
        # FP32 regions pass FP32 to each other (no FP32->FP16->FP32 round trips, which would
        # overflow (x-u)^2 in LayerNorm2d), and read FP32 weights, not FP16 ones cast up.
        producer = {o: n for n in nodes for o in n.output}

        def cast_to(node):
            return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

        for node in nodes:
            if cast_to(node) == TensorProto.FLOAT:
                src = node.input[0]
                assert not (src in producer and cast_to(producer[src]) == TensorProto.FLOAT16), (graph, node.name)
                assert src not in {i.name for i in model.graph.initializer}, (graph, node.name)
        for node in nodes:
            if node.op_type == "Pow":
                assert types.get(node.output[0]) == TensorProto.FLOAT, (graph, node.name)


def test_cellfinder_parity_tiny(tiny_model_dir: Path, tiny):
    """CellFinder graph == PyTorch on the tiny config, at B=1 and B=2 (FP16 measured 2.4e-4 / 4.7e-5)."""
    gen = torch.Generator().manual_seed(5)
    sess = session(tiny_model_dir / "cellfinder.onnx")
    sess16 = session(tiny_model_dir / "cellfinder.fp16.onnx")
    for b in (1, 2):
        x = torch.randn(b, 3, 256, 256, generator=gen)
        with torch.no_grad():
            ref_logits, ref_boxes = (t.numpy() for t in tiny.cellfinder(x))
        logits, boxes = sess.run(None, {"image": x.numpy()})
        assert logits.shape == (b, 50, 2) and boxes.shape == (b, 50, 4)
        assert rel_err(logits, ref_logits) <= FP32_TOL
        assert rel_err(boxes, ref_boxes) <= FP32_TOL
        logits16, boxes16 = sess16.run(None, {"image": x.numpy()})
        assert rel_err(logits16, ref_logits) <= 3e-3
        assert rel_err(boxes16, ref_boxes) <= 5e-4


# ---------------------------------------------------------------------------------------------
# The full 3500-query Anchor-DETR head (tiny trunk)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # the full 3500-query head: half a minute or more on 2 cores
def test_cellfinder_parity_full_head(tmp_path: Path):
    """CellFinder graph with the full 3500-query head == PyTorch (logits and boxes), FP32 and FP16.

    Measured: FP32 logits 4.7e-7, boxes 5.5e-8; FP16 logits 3.4e-4, boxes 4.6e-5.
    """
    model = tiny_model("full_head", seed=1)
    path = export_cellfinder(model.cellfinder, tmp_path / "cellfinder.onnx")  # size from the trunk
    path16 = convert_to_fp16(path, tmp_path / "cellfinder.fp16.onnx")
    # One image: the batch axis is covered by the tiny tests, and each image costs ~10 s here.
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_logits, ref_boxes = (t.numpy() for t in model.cellfinder(x))
    logits, boxes = session(path).run(None, {"image": x.numpy()})
    assert logits.shape == (1, 3500, 2) and boxes.shape == (1, 3500, 4)
    assert rel_err(logits, ref_logits) <= FP32_TOL
    assert rel_err(boxes, ref_boxes) <= FP32_TOL
    logits16, boxes16 = session(path16).run(None, {"image": x.numpy()})
    assert rel_err(logits16, ref_logits) <= 3e-3
    assert rel_err(boxes16, ref_boxes) <= 5e-4


# ---------------------------------------------------------------------------------------------
# Model directory writing: atomic, refuses to overwrite, replaces only after success
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint file (seed 0)."""
    from cellsam_export.testing import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", config="tiny")


def test_export_model_dir_refuses_existing_dir(tmp_path: Path, tiny_checkpoint: Path):
    """An existing output directory is an error without force, and is left untouched."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_model_dir(tiny_checkpoint, out, fp16=False, progress=None)
    assert (out / "keep.txt").read_text() == "mine"


def test_export_model_dir_failure_leaves_old_dir(tmp_path: Path, tiny_checkpoint: Path, monkeypatch):
    """A failing export with force keeps the old directory and leaves no temporary files."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def boom(*args, **kwargs):
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(onnx_export, "export_cellfinder", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model_dir(tiny_checkpoint, out, fp16=False, force=True, progress=None)
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.slow  # a whole export; the CLI's export test covers --force and progress by default
def test_export_model_dir_force_replaces_and_reports_progress(tmp_path: Path, tiny_checkpoint: Path):
    """With force, a successful export replaces the old directory; progress names each graph."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    messages: list[str] = []
    export_model_dir(tiny_checkpoint, out, fp16=False, force=True, progress=messages.append)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cellfinder.cpu.onnx", "cellfinder.onnx", "decoder.onnx", "encoder.cpu.onnx",
                     "encoder.onnx", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["graphs"]) == ["fp32"]
    assert manifest["source"]["checkpoint"] == "tiny.pt"
    for graph in ("encoder", "cellfinder", "decoder", "encoder.cpu", "cellfinder.cpu"):
        assert any(m.startswith(f"exported {graph}") and m.endswith(" s") for m in messages), messages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.slow  # a whole model-directory export: about a minute on 2 cores
def test_export_model_dir_with_a_windowed_decoder(tmp_path: Path, tiny_checkpoint: Path):
    """decoder_window adds the graph (FP16 runs share the FP32 file) and the policy; the runtime
    then decodes through it."""
    from cellsam_export.onnx_export import DEFAULT_DECODER_WINDOW
    from cellsam_rt.model_dir import ModelDir

    out = export_model_dir(tiny_checkpoint, tmp_path / "model", fp16=True, cpu_graphs=False,
                           progress=None, decoder_window={"min": 4, "max": 16, "box_factor": 3})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoder_window"] == {"min": 4, "max": 16, "box_factor": 3}
    assert manifest["graphs"]["fp32"]["decoder_window"] == "decoder_window.onnx"
    assert manifest["graphs"]["fp16"]["decoder_window"] == "decoder_window.onnx"
    assert not (out / "decoder_window.fp16.onnx").exists()
    md = ModelDir.load(out)
    assert md.has_graph("decoder_window", "fp16") and md.decoder_window["box_factor"] == 3.0
    assert DEFAULT_DECODER_WINDOW["max"] >= DEFAULT_DECODER_WINDOW["min"]

    from cellsam_rt.pipeline.segmenter import Segmenter

    calls = []
    seg = Segmenter(out, tile="never", bbox_threshold=0.0)
    run = seg.backend.run
    seg.backend.run = lambda graph, feeds: calls.append(graph + ("+paste" if "paste" in feeds else "")) or run(graph, feeds)
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    seg.segment(image, boxes=np.array([[10, 10, 20, 24]], np.float32))
    # the exported graph upscales only a block around the box
    assert "decoder_window+paste" in calls and "decoder" not in calls
    calls.clear()
    full = Segmenter(out, tile="never", decoder="full")
    run_full = full.backend.run
    full.backend.run = lambda graph, feeds: calls.append(graph) or run_full(graph, feeds)
    full.segment(image, boxes=np.array([[10, 10, 20, 24]], np.float32))
    assert "decoder" in calls and "decoder_window" not in calls


# ---------------------------------------------------------------------------------------------
# Full size (ViT-B, 1024 px, 3500 queries): one export, one parity check per graph
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def two_torch_threads():
    """Full-size PyTorch references take minutes on one thread; use both CI cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.slow
def test_full_size_export_and_parity(tmp_path: Path, tsv_path: Path, two_torch_threads):
    """Random weights in the official layout -> checkpoint file -> model dir -> ORT == PyTorch.

    Measured on 2 cores shared with other jobs (load ~7): ~6 min in all, of which export
    147 s (encoder 35 s + fp16 10 s, CellFinder 84 s + 9 s, decoder 9 s + 0.3 s).
    Parity FP32 <= 1.1e-6 for every graph; FP16 encoder 5.3e-4, CellFinder logits 2.8e-4 /
    boxes 4.7e-5, decoder masks 6.8e-4 / iou 5.7e-4.
    """
    from cellsam_export.checkpoint import load_checkpoint

    timings: dict[str, float] = {}
    t0 = t_start = time.perf_counter()
    sd = random_state_dict("full", with_model_cp=False, seed=0, tsv_path=tsv_path)
    ckpt = save_checkpoint(tmp_path / "cellsam_general.pt", sd)  # flat, like the official file
    del sd
    # The same strict loader the CLI uses; the loaded model is then both exported and the oracle.
    model, info = load_checkpoint(ckpt)
    timings["checkpoint"] = time.perf_counter() - t0
    messages: list[str] = []
    t0 = time.perf_counter()
    out = export_model_dir((model, info), tmp_path / "model", fp16=True, progress=messages.append)
    timings["export"] = time.perf_counter() - t0
    print("\n" + "\n".join(messages))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_size"] == 1024
    assert manifest["embedding_shape"] == [256, 64, 64]
    assert manifest["mask_size"] == 256
    assert manifest["num_queries"] == 3500 and manifest["num_classes"] == 2
    assert manifest["preprocessing"]["has_model_cp"] is False
    assert manifest["source"]["config"] == "full"
    assert manifest["source"]["checkpoint"] == "cellsam_general.pt"
    assert manifest["source"]["sha256"] == info["sha256"]
    # The 64x64-token global blocks of both trunks run on cellsam-rt's kernel.
    assert manifest["cpu_custom_ops"] == ["com.cellsam.RelPosAttention"]
    sizes = {p.name: p.stat().st_size / 1e6 for p in out.glob("*.onnx")}
    print("sizes MB:", {k: round(v, 1) for k, v in sorted(sizes.items())})
    # ~92M / ~105M / ~4.8M float32 parameters; fp16 halves them.
    assert 330 < sizes["encoder.onnx"] < 400
    assert 380 < sizes["cellfinder.onnx"] < 460
    assert 10 < sizes["decoder.onnx"] < 25
    for g in ("encoder", "cellfinder", "decoder"):
        assert 0.45 < sizes[f"{g}.fp16.onnx"] / sizes[f"{g}.onnx"] < 0.6
    for g in ("encoder", "cellfinder"):  # fused-attention CPU variants: same weights
        assert 0.95 < sizes[f"{g}.cpu.onnx"] / sizes[f"{g}.onnx"] < 1.1
    assert {p.name for p in out.iterdir()} == set(sizes) | {"manifest.json"}  # single-file graphs

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 1024, 1024, generator=gen)
    errs = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        ref_emb = model.sam.image_encoder(x)
    timings["torch encoder"] = time.perf_counter() - t0
    for suffix in ("", ".fp16", ".cpu"):
        t0 = time.perf_counter()
        got = session(out / f"encoder{suffix}.onnx").run(None, {"image": x.numpy()})[0]
        timings[f"ort encoder{suffix}"] = time.perf_counter() - t0
        errs[f"encoder{suffix}"] = rel_err(got, ref_emb.numpy())

    t0 = time.perf_counter()
    with torch.no_grad():
        ref_logits, ref_boxes = (t.numpy() for t in model.cellfinder(x))
    timings["torch cellfinder"] = time.perf_counter() - t0
    for suffix in ("", ".fp16", ".cpu"):
        t0 = time.perf_counter()
        logits, boxes = session(out / f"cellfinder{suffix}.onnx").run(None, {"image": x.numpy()})
        timings[f"ort cellfinder{suffix}"] = time.perf_counter() - t0
        assert logits.shape == (1, 3500, 2) and boxes.shape == (1, 3500, 4)
        errs[f"cellfinder{suffix}.logits"] = rel_err(logits, ref_logits)
        errs[f"cellfinder{suffix}.boxes"] = rel_err(boxes, ref_boxes)

    t0 = time.perf_counter()
    embeddings = torch.cat([ref_emb, ref_emb.flip(-1)])  # T = 2
    boxes = random_boxes(5, 1024, gen)
    box_image = torch.tensor([0, 1, 1, 0, 1])
    ref_masks, ref_iou = reference_decoder(model.sam, embeddings, boxes, box_image)
    feeds = {"embeddings": embeddings.numpy(), "boxes": boxes.numpy(), "box_image": box_image.numpy()}
    for suffix in ("", ".fp16"):
        masks, iou = session(out / f"decoder{suffix}.onnx").run(None, feeds)
        assert masks.shape == (5, 1, 256, 256) and iou.shape == (5, 1)
        errs[f"decoder{suffix}.masks"] = rel_err(masks, ref_masks)
        errs[f"decoder{suffix}.iou"] = rel_err(iou, ref_iou)
    timings["decoder (torch + ort)"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    print("parity:", {k: f"{v:.2e}" for k, v in errs.items()})
    print("timings s:", {k: round(v, 1) for k, v in timings.items()})
    for key, err in errs.items():
        assert err <= (FP32_TOL if ".fp16" not in key else 5e-3), (key, err)
