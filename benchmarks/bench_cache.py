"""Benchmark inputs made once and kept: random-weight checkpoints, model directories, INT8 graphs.

The cache lives in $CELLSAM_RT_BENCH_CACHE (default ~/.cache/cellsam-rt/benchmarks), outside
the repository: the full-size model directory is ~1.2 GB and takes minutes to export.

    python benchmarks/bench_cache.py          # build everything the benchmarks need
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 0


def cache_dir() -> Path:
    """Root of the benchmark cache (created on first use)."""
    root = Path(os.environ.get("CELLSAM_RT_BENCH_CACHE")
                or Path.home() / ".cache" / "cellsam-rt" / "benchmarks")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _say(msg: str) -> None:
    print(f"[bench-cache {time.strftime('%X')}] {msg}", file=sys.stderr, flush=True)


def checkpoint(config: str = "full") -> Path:
    """A random-weight checkpoint in the official key layout (our config embedded)."""
    from cellsam_export.testing import make_random_checkpoint

    path = cache_dir() / config / f"cellsam_random_{config}_seed{SEED}.pt"
    if not path.exists():
        _say(f"writing random {config} checkpoint {path}")
        tmp = path.with_name(path.name + ".part")
        make_random_checkpoint(tmp, config=config, with_model_cp=False, seed=SEED)
        tmp.replace(path)
    return path


def model_dir(config: str = "full") -> Path:
    """The exported model directory (FP32 + FP16 graphs) of `checkpoint(config)`."""
    from cellsam_export.onnx_export import export_model_dir

    out = cache_dir() / config / "model"
    if not (out / "manifest.json").exists():
        ckpt = checkpoint(config)
        _say(f"exporting {ckpt.name} to {out} (full size: ~5 min)")
        export_model_dir(ckpt, out, fp16=True, opset=18, force=True, progress=_say)
    _add_cpu_graphs(out, config)
    _refresh_cpu_graphs(out, config)
    _refresh_decoder(out, config)
    return out


def _refresh_cpu_graphs(out: Path, config: str) -> None:
    """Re-export the CPU trunks (minutes) when the fused-attention export code has changed;
    the INT8 graphs quantised from them go too (made again on use)."""
    import hashlib
    import inspect
    import json

    from cellsam_export import ort_fusions
    from cellsam_export.checkpoint import load_checkpoint
    from cellsam_export.onnx_export import CPU_GRAPHS, _custom_ops_of, cpu_graph_file, export_cpu_graph

    stamp = hashlib.sha256(inspect.getsource(ort_fusions).encode()).hexdigest()
    stamp_file = out / "cpu_graphs.source-sha256"
    if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        return
    _say("fused-attention export code changed: re-exporting the CPU trunks")
    model, _ = load_checkpoint(checkpoint(config))
    needed = set()
    for graph in CPU_GRAPHS:
        dst = out / cpu_graph_file(graph)
        part = out / (dst.name + ".part")
        export_cpu_graph(model.eval(), graph, part)
        part.replace(dst)
        needed.update(_custom_ops_of(dst))
        for derived in out.glob(f"{graph}.cpu.int8*.onnx"):
            derived.unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("cpu_custom_ops", None)
    if needed:
        manifest["cpu_custom_ops"] = sorted(needed)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    stamp_file.write_text(stamp + "\n")


def _refresh_decoder(out: Path, config: str) -> None:
    """Re-export the decoder (seconds, unlike the trunks) when its export code has changed."""
    import hashlib
    import inspect

    from cellsam_export.checkpoint import load_checkpoint
    from cellsam_export.fp16 import convert_to_fp16
    from cellsam_export.modeling import box_decoder
    from cellsam_export.onnx_export import DecoderGraph, export_decoder

    source = inspect.getsource(DecoderGraph) + inspect.getsource(box_decoder)
    stamp = hashlib.sha256(source.encode()).hexdigest()
    stamp_file = out / "decoder.source-sha256"
    if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        return
    _say("decoder export code changed: re-exporting decoder.onnx / decoder.fp16.onnx")
    model, _ = load_checkpoint(checkpoint(config))
    for name, make in (("decoder.onnx", lambda p: export_decoder(model.eval(), p)),
                       ("decoder.fp16.onnx", lambda p: convert_to_fp16(out / "decoder.onnx", p))):
        part = out / (name + ".part")
        make(part)
        part.replace(out / name)
    stamp_file.write_text(stamp + "\n")


def _add_cpu_graphs(out: Path, config: str) -> None:
    """Add the fused-attention CPU graphs to a cached model directory that lacks them."""
    import json

    from cellsam_export.checkpoint import load_checkpoint
    from cellsam_export.onnx_export import CPU_GRAPHS, cpu_graph_file, export_cpu_graph

    manifest = json.loads((out / "manifest.json").read_text())
    if "cpu_graphs" in manifest:
        return
    model, _ = load_checkpoint(checkpoint(config))
    for graph in CPU_GRAPHS:
        dst = out / cpu_graph_file(graph)
        if not dst.exists():
            _say(f"exporting {dst.name} (fused attention)")
            export_cpu_graph(model.eval(), graph, out / (dst.name + ".part"))
            (out / (dst.name + ".part")).replace(dst)
    manifest["cpu_graphs"] = {"fp32": {g: cpu_graph_file(g) for g in CPU_GRAPHS}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def int8_graphs(md: Path, per_channel: bool = False, weights_only: bool = True,
                fused: bool = True) -> dict:
    """INT8 encoder/CellFinder next to the FP32 ones: the int8 graphs entry (decoder stays FP32).

    fused: quantise the fused-attention CPU graphs (what `cellsam-rt quantize` does), else the
    plain ones.
    """
    from cellsam_rt.tools.quantize import quantize_graph

    suffix = ("cpu." if fused else "") + ("int8pc" if per_channel else "int8") + (
        "" if weights_only else "attn")
    entry = {"decoder": "decoder.onnx"}
    for graph in ("encoder", "cellfinder"):
        dst = md / f"{graph}.{suffix}.onnx"
        src = md / (f"{graph}.cpu.onnx" if fused else f"{graph}.onnx")
        if not dst.exists():
            _say(f"quantising {src.name} ({suffix})")
            quantize_graph(src, dst, per_channel=per_channel, weights_only=weights_only)
        entry[graph] = dst.name
    return entry


def fused_graph(md: Path, graph: str = "encoder") -> str:
    """The graph after onnxruntime.transformers' ViT fusions (BiasGelu, LayerNorm), file name."""
    name = f"{graph}.fused_vit.onnx"
    if not (md / name).exists():
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        _say(f"fusing {graph} (onnxruntime.transformers, model_type vit)")
        options = FusionOptions("vit")
        # Its LayerNorm fusion turns the neck's channel-axis LayerNorm2d into a last-axis
        # SimplifiedLayerNormalization: 14 % embedding error. The ViT's own LayerNorms are
        # already single LayerNormalization nodes, so nothing is lost by turning it off.
        options.enable_layer_norm = False
        # num_heads/hidden_size 0: read from the graph; opt_level 0: python fusions only (ORT's
        # own level-all optimisations still run when the session loads it).
        fused = optimize_model(str(md / f"{graph}.onnx"), model_type="vit", num_heads=0,
                               hidden_size=0, opt_level=0, use_gpu=False,
                               optimization_options=options)
        fused.save_model_to_file(str(md / (name + ".part")))
        (md / (name + ".part")).replace(md / name)
    return name


def variant_model(md: Path, precision: str, files: dict):
    """A ModelDir whose in-memory manifest adds `precision` with `files` over the FP32 graphs.

    `cellsam-rt quantize` writes such an entry into manifest.json; benchmarks leave the cached
    directory's manifest untouched so that several variants can be compared side by side.
    """
    import json

    from cellsam_rt.model_dir import ModelDir

    base = ModelDir.load(md)
    manifest = json.loads(json.dumps(dict(base.manifest)))
    manifest["graphs"][precision] = {**manifest["graphs"]["fp32"], **files}
    return ModelDir(path=base.path, manifest=manifest)


def cpu_backend(md, threads=None, precision: str = "fp32", arena: str = "shared", **kw):
    """ONNX Runtime CPU backend of a model directory; `arena` as OrtBackend's (default: one
    arena shared by every session of the process)."""
    from cellsam_rt.backends.onnxruntime import OrtBackend
    from cellsam_rt.model_dir import resolve_model

    return OrtBackend(resolve_model(md), device="cpu", precision=precision, threads=threads,
                      arena=arena, **kw)


def variant_backend(md: Path, precision: str, files: dict, threads=None, arena: str = "shared",
                    **kw):
    """An ONNX Runtime CPU backend on a variant (built directly: see variant_model)."""
    from cellsam_rt.backends.onnxruntime import OrtBackend

    return OrtBackend(variant_model(md, precision, files), device="cpu", precision=precision,
                      threads=threads, arena=arena, **kw)


def int8_backend(md: Path, per_channel: bool = False, threads=None, arena: str = "shared",
                 weights_only: bool = True, fused: bool = True, **kw):
    """An ONNX Runtime CPU backend on the INT8 trunks and the FP32 decoder."""
    return variant_backend(md, "int8", int8_graphs(md, per_channel, weights_only, fused),
                           threads=threads, arena=arena, **kw)


def embeddings_file(md: Path, size: int = 512) -> Path:
    """The encoder's embedding of the synthetic size x size image, saved once (decoder runs)."""
    import numpy as np

    path = md.parent / f"embeddings_synthetic{size}.npy"
    if not path.exists():
        from cellsam_rt.backends import create_backend
        from cellsam_rt.tools.bench import synthetic_cells
        from cellsam_rt.model_dir import ModelDir
        from cellsam_rt.stages.preprocess import preprocess

        model = ModelDir.load(md)
        image, _boxes = synthetic_cells(size, 32)
        enc_in, _fin, _norm = preprocess(image, model.image_size, model.has_model_cp)
        _say(f"computing embeddings for {path.name}")
        emb = create_backend(model).run("encoder", {"image": enc_in[None]})["embeddings"]
        np.save(path, emb)
    return path


if __name__ == "__main__":
    for cfg in ("tiny", "full"):
        md = model_dir(cfg)
        int8_graphs(md)
        _say(f"{cfg}: {md}")
    embeddings_file(model_dir("full"))
