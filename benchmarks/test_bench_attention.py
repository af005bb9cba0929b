"""One global attention block (SAM ViT-B: 12 heads x 64 channels over 64x64 tokens, decomposed
relative positions) in each form the graphs can take, in one process on the same inputs:

- plain: the portable graphs' ops (scores materialised: MatMul, two broadcast Adds, Softmax,
  MatMul);
- mha-augmented: com.microsoft.MultiHeadAttention with rel_h/rel_w folded into one-hot q/k
  columns (192 dims per head), what the CPU graphs run without cellsam-rt's kernel;
- relpos-kernel (and -avx2, capped by CELLSAM_RT_KERNEL_ISA): com.cellsam.RelPosAttention;
- mha-no-relpos: MultiHeadAttention at 64 dims without relative positions, a floor for
  comparison only (a different function).

Each side's output is checked against plain (max abs difference recorded). GFLOP/s counts the
model's own q.k and p.v arithmetic (4 * S^2 * D per head) for every side.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import median, record

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from cellsam_rt import kernels as ops  # noqa: E402

SIDES = ["plain", "mha-augmented", "relpos-kernel", "relpos-kernel-avx2", "mha-no-relpos"]
SHAPES = {"full": (12, 64, 64), "tiny": (4, 32, 16)}  # heads, head size, grid side


def _t(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes, inputs, inits=()):
    graph = helper.make_graph(nodes, "attn", inputs, [_t("out", None)], list(inits))
    return helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1),
        helper.make_opsetid(ops.DOMAIN, 1)]).SerializeToString()


def _graphs(heads: int, d: int, g: int) -> dict:
    """(model bytes, feed builder) per side; inputs are [B=1, S, heads*D] etc."""
    s = g * g
    c = lambda name, v: helper.make_tensor(  # noqa: E731
        name, TensorProto.INT64, [len(v)], v)
    plain = _model(
        [helper.make_node("Reshape", ["q", "qkv_shape"], ["q4"]),
         helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
         helper.make_node("Reshape", ["k", "qkv_shape"], ["k4"]),
         helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
         helper.make_node("Reshape", ["v", "qkv_shape"], ["v4"]),
         helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
         helper.make_node("MatMul", ["qh", "kt"], ["s0"]),
         helper.make_node("Reshape", ["s0", "grid_shape"], ["s1"]),
         helper.make_node("Transpose", ["rel_h"], ["rh0"], perm=[0, 2, 1, 3]),
         helper.make_node("Reshape", ["rh0", "rh_shape"], ["rh"]),
         helper.make_node("Transpose", ["rel_w"], ["rw0"], perm=[0, 2, 1, 3]),
         helper.make_node("Reshape", ["rw0", "rw_shape"], ["rw"]),
         helper.make_node("Add", ["s1", "rh"], ["s2"]),
         helper.make_node("Add", ["s2", "rw"], ["s3"]),
         helper.make_node("Reshape", ["s3", "score_shape"], ["s4"]),
         helper.make_node("Softmax", ["s4"], ["p"], axis=-1),
         helper.make_node("MatMul", ["p", "vh"], ["o"]),
         helper.make_node("Transpose", ["o"], ["o2"], perm=[0, 2, 1, 3]),
         helper.make_node("Reshape", ["o2", "out_shape"], ["out"])],
        [_t("q", [1, s, heads * d]), _t("k", [1, s, heads * d]), _t("v", [1, s, heads * d]),
         _t("rel_h", [1, s, heads, g]), _t("rel_w", [1, s, heads, g])],
        [c("qkv_shape", [1, s, heads, d]), c("grid_shape", [1, heads, s, g, g]),
         c("rh_shape", [1, heads, s, g, 1]), c("rw_shape", [1, heads, s, 1, g]),
         c("score_shape", [1, heads, s, s]), c("out_shape", [1, s, heads * d])])
    mha = lambda dqk: _model(  # noqa: E731
        [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft",
                          num_heads=heads, scale=1.0)],
        [_t("q", [1, s, heads * dqk]), _t("k", [1, s, heads * dqk]), _t("v", [1, s, heads * d])])
    kernel = _model(
        [helper.make_node("RelPosAttention", ["q", "k", "v", "rel_h", "rel_w"], ["out"],
                          domain=ops.DOMAIN)],
        [_t("q", [1, s, heads * d]), _t("k", [1, s, heads * d]), _t("v", [1, s, heads * d]),
         _t("rel_h", [1, s, heads, g]), _t("rel_w", [1, s, heads, g])])

    rows, cols = np.divmod(np.arange(s), g)
    onehot = np.concatenate([np.eye(g, dtype=np.float32)[rows], np.eye(g, dtype=np.float32)[cols]], -1)

    def augmented(f):
        q = np.concatenate([f["q"].reshape(1, s, heads, d), f["rel_h"], f["rel_w"]], -1)
        k = np.concatenate([f["k"].reshape(1, s, heads, d),
                            np.broadcast_to(onehot[None, :, None, :], (1, s, heads, 2 * g))], -1)
        return {"q": q.reshape(1, s, -1), "k": k.reshape(1, s, -1), "v": f["v"]}

    same = lambda f: f  # noqa: E731
    return {"plain": (plain, same), "mha-augmented": (mha(d + 2 * g), augmented),
            "relpos-kernel": (kernel, same), "relpos-kernel-avx2": (kernel, same),
            "mha-no-relpos": (mha(d), lambda f: {n: f[n] for n in ("q", "k", "v")})}


@pytest.fixture(scope="module")
def attention_case(bench_config):
    heads, d, g = SHAPES[bench_config]
    rng = np.random.default_rng(0)
    s = g * g
    feed = {n: rng.standard_normal((1, s, heads * d), dtype=np.float32) for n in "qkv"}
    feed["q"] *= np.float32(d ** -0.5)
    feed["rel_h"] = rng.standard_normal((1, s, heads, g), dtype=np.float32)
    feed["rel_w"] = rng.standard_normal((1, s, heads, g), dtype=np.float32)
    return {"shape": (heads, d, g), "feed": feed, "graphs": _graphs(heads, d, g), "plain": {}}


@pytest.mark.parametrize("side", SIDES)
def test_global_attention(benchmark, attention_case, side, threads, monkeypatch):
    if side.startswith("relpos") and not ops.status()[0]:
        pytest.skip(ops.status()[1])
    if side == "relpos-kernel-avx2":
        monkeypatch.setenv("CELLSAM_RT_KERNEL_ISA", "avx2")
    heads, d, g = attention_case["shape"]
    model, make_feed = attention_case["graphs"][side]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if side.startswith("relpos"):
        ops.register(opts)
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    feed = make_feed(attention_case["feed"])
    out = sess.run(None, feed)[0]
    benchmark.pedantic(sess.run, args=(None, feed), rounds=5, warmup_rounds=1, iterations=1)
    if side == "plain":
        attention_case["plain"]["out"] = out
    ref = attention_case["plain"].get("out")
    diff = None if ref is None or side == "mha-no-relpos" else float(np.abs(out - ref).max())
    seconds = median(benchmark.stats.stats.data)
    gflop = 4 * heads * (g * g) ** 2 * d / 1e9
    record("attention", side, {"median_s": seconds, "gflop": gflop, "gflops": gflop / seconds,
                               "max_abs_diff_vs_plain": diff, "threads": threads,
                               "isa": os.environ.get("CELLSAM_RT_KERNEL_ISA", "best")})
    if diff is not None:
        assert diff <= 1e-4 * max(1.0, float(np.abs(ref).max()))
