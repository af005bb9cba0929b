"""The `cellsam-rt` command: segment images (`run`), describe a model (`info`), and more."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from .. import __version__

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2
EXPORT_INSTALL_HINT = "pip install 'cellsam-rt[export]'"


@dataclass(frozen=True)
class LazyCommand:
    """A subcommand whose module is imported only when that subcommand runs."""

    name: str
    module: str
    help: str
    add_arguments: str = "add_arguments"
    run: str = "run"
    always_listed: bool = False  # list it even when the module cannot be found (export)


# Subcommands that live in their own modules. Each module provides `add_arguments(parser)` and
# `run(args) -> int`; an entry is offered only once its module exists, so later tasks register a
# subcommand by adding its module (and, for a new name, a line here).
LAZY_COMMANDS = [
    LazyCommand("export", "cellsam_export.export_cli",
                "export a CellSAM checkpoint to a model directory (needs PyTorch: "
                f"{EXPORT_INSTALL_HINT})",
                add_arguments="add_export_arguments", run="run_export", always_listed=True),
    LazyCommand("build-engines", "cellsam_rt.engines",
                "build TensorRT engines for a model on this machine's GPU"),
    LazyCommand("bench", "cellsam_rt.bench", "measure latency and throughput"),
    LazyCommand("quantize", "cellsam_rt.quantize",
                "add INT8 (dynamically quantised) trunks to a model, for CPU inference"),
    LazyCommand("evaluate", "cellsam_rt.evaluate", "score segmentations against ground truth"),
    LazyCommand("watch", "cellsam_rt.cli.watch",
                "segment images as they appear in a folder or a growing plate"),
    LazyCommand("track", "cellsam_rt.cli.track",
                "segment a time-lapse and link cells over time (divisions, lineages)"),
    LazyCommand("track-score", "cellsam_rt.cli.track_score",
                "score tracking results against ground truth (CTC format)"),
    LazyCommand("spots", "cellsam_rt.cli.spots",
                "assign RNA spots to cells: per-spot cell ids and a cell x gene matrix"),
    LazyCommand("napari", "cellsam_rt.cli.napari",
                "open napari with the cellsam-rt plugin docked"),
]
# Packages whose absence means "the [export] extra is not installed".
_EXPORT_PACKAGES = {"torch", "onnx", "onnxscript", "onnxconverter_common", "segment_anything",
                    "cellsam_export"}


def _module_exists(name: str) -> bool:
    """True if `name` can be imported, without importing it (its parent package is imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _listed(cmd: LazyCommand) -> bool:
    # find_spec would import cellsam_export's package; export is always listed instead.
    return cmd.always_listed or _module_exists(cmd.module)


def error(message: str) -> None:
    """Print a one-line error for the user on stderr."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)


# -- argument parsing ---------------------------------------------------------------------------

def _channels(text: str) -> tuple[int, ...]:
    """Parse --channels "N" or "N,W" (nuclear, whole-cell input channel indices)."""
    parts = [p.strip() for p in text.split(",")]
    if not 1 <= len(parts) <= 2:
        raise argparse.ArgumentTypeError("expected NUCLEAR or NUCLEAR,WHOLECELL (e.g. 0 or 0,1)")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"channel indices must be integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"channel indices start at 0, got {text!r}")
    return values


def _plane(text: str) -> tuple[str, int]:
    """Parse --plane "Z=3"."""
    axis, sep, index = text.partition("=")
    if not sep or len(axis.strip()) != 1 or not axis.strip().isalpha():
        raise argparse.ArgumentTypeError(f"expected AXIS=INDEX such as Z=3, got {text!r}")
    try:
        return axis.strip().upper(), int(index)
    except ValueError:
        raise argparse.ArgumentTypeError(f"plane index must be an integer, got {text!r}") from None


def _positive_int(text: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def _count(text: str) -> int:
    return _positive_int(text, minimum=0)


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt run`."""
    from ..backends import BACKENDS, PRECISIONS  # light: no onnxruntime until a backend is made

    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files (TIFF/OME-TIFF, PNG, JPEG, NPY), folders (their images, "
                             "not recursive) or glob patterns")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder (created if missing): <name>_labels.tif, "
                             "<name>_cells.csv and, with --overlay, <name>_overlay.png")
    parser.add_argument("--model", default="default", metavar="M",
                        help="model directory, or 'default' for the model shipped with "
                             "cellsam-rt (default)")
    parser.add_argument("--channels", type=_channels, default=None, metavar="N[,W]",
                        help="input channel index of the nuclear stain and, optionally, of the "
                             "whole-cell stain (0-based); needed for images with >3 channels")
    parser.add_argument("--axes", default=None, metavar="AXES",
                        help="dimension order of the input, e.g. YX, CYX, YXC, ZCYX (default: from "
                             "the file's metadata; 3-D without metadata: the smallest axis is "
                             "the channel axis)")
    parser.add_argument("--plane", type=_plane, action="append", default=[], metavar="AXIS=I",
                        help="for stacks: the plane to segment along a non-channel axis, e.g. "
                             "Z=3 (repeatable)")
    parser.add_argument("--backend", choices=BACKENDS, default="cpu",
                        help="inference backend (default cpu); tensorrt-ep = TensorRT through "
                             "onnxruntime, tensorrt = native TensorRT engines")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="graph precision (default fp32); int8 = CPU only, after "
                             "`cellsam-rt quantize`")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads for inference (default: all cores)")
    parser.add_argument("--tile", choices=("auto", "never", "always"), default="auto",
                        help="tile large images: auto decides from the cell size like the "
                             "reference (default auto)")
    parser.add_argument("--bbox-threshold", type=_unit_float, default=None, metavar="X",
                        help="detection threshold (default: the model's, 0.4 for CellSAM)")
    parser.add_argument("--boxes", type=Path, default=None, metavar="FILE",
                        help="use these boxes (CSV or JSON, x0,y0,x1,y1 in image pixels) instead "
                             "of detection; only with a single INPUT")
    parser.add_argument("--overlay", action="store_true",
                        help="also write <name>_overlay.png with cell outlines")
    parser.add_argument("--chunk-size", type=_positive_int, default=None, metavar="N",
                        help="boxes per mask-decoder call (default: the backend's, 4 on the CPU, 32 on a "
                             "GPU; bounds memory, ~50 MB per box at full size)")
    parser.add_argument("--workers", type=_count, default=1, metavar="N",
                        help="threads that read and preprocess the next images while one is "
                             "segmented (default 1; 0 = one image after another)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or per-image lines; errors are still printed")
    parser.add_argument("--debug", action="store_true",
                        help="on an unexpected error, show the full traceback")


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt info`."""
    parser.add_argument("model", nargs="?", default="default", metavar="MODEL",
                        help="model directory or 'default' (default)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON only")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; lazy subcommands appear for --help only (main() dispatches them)."""
    parser = argparse.ArgumentParser(
        prog="cellsam-rt", description="Fast, torch-free CellSAM cell segmentation.")
    parser.add_argument("--version", action="version", version=f"cellsam-rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_run_arguments(sub.add_parser("run", help="segment images",
                                     description="Segment cells in microscopy images."))
    add_info_arguments(sub.add_parser("info", help="describe a model and the inference software",
                                      description="Describe a model directory and the "
                                                  "installed inference software."))
    for cmd in LAZY_COMMANDS:
        if _listed(cmd):
            sub.add_parser(cmd.name, help=cmd.help, add_help=False)
    return parser


# -- lazy subcommands ---------------------------------------------------------------------------

def _run_lazy(cmd: LazyCommand, argv: Sequence[str]) -> int:
    """Import the subcommand's module, parse its arguments and run it."""
    from ..backends.base import BackendError
    from ..io import ImageReadError, OutputDirError
    from ..model_dir import ModelDirError

    try:
        module = importlib.import_module(cmd.module)
        parser = argparse.ArgumentParser(prog=f"cellsam-rt {cmd.name}", description=cmd.help)
        getattr(module, cmd.add_arguments)(parser)
        args = parser.parse_args(list(argv))
        return int(getattr(module, cmd.run)(args) or 0)
    except ModuleNotFoundError as exc:
        # Export's dependencies may be imported only once it runs, so check here too.
        top = (exc.name or "").split(".")[0]
        if cmd.name == "export" and top in _EXPORT_PACKAGES:
            error(f"export needs PyTorch: {EXPORT_INSTALL_HINT} (missing: {exc.name})")
        elif exc.name == cmd.module:
            error(f"`cellsam-rt {cmd.name}` is not available in this installation ({exc})")
        else:
            raise
        return EXIT_USAGE
    except (BackendError, ModelDirError, ImageReadError, OutputDirError) as exc:
        # Subcommands read files too: a bad one is a one-line error, not a traceback.
        error(exc)
        return EXIT_USAGE


# -- info ---------------------------------------------------------------------------------------

def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def cmd_info(args: argparse.Namespace) -> int:
    """Print the model's manifest summary, its graphs and the inference software found."""
    from ..model_dir import ModelDirError, resolve_model

    try:
        model = resolve_model(args.model)
    except ModelDirError as exc:
        if not args.json:
            _print_software()  # still useful when diagnosing an installation
        error(exc)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(dict(model.manifest), indent=2))
        return EXIT_OK
    m = model.manifest
    c, h, w = model.embedding_shape
    print(f"model        {model.name}  ({model.path})")
    if model.description:
        print(f"description  {model.description}")
    print(f"format       version {m['format_version']}, opset {m.get('opset', '?')}")
    print(f"input        3x{model.image_size}x{model.image_size}; embeddings {c}x{h}x{w}; "
          f"masks {model.mask_size}x{model.mask_size}"
          + (f"; {model.num_queries} queries" if model.num_queries else ""))
    print(f"preprocess   mode {model.preprocessing_mode}, has_model_cp {model.has_model_cp}")
    print("thresholds   " + ", ".join(f"{k} {v}" for k, v in model.thresholds.items()))
    src = m.get("source") or {}
    if src:
        print("source       " + ", ".join(f"{k} {v}" for k, v in src.items() if v is not None))
    exp = m.get("exporter") or {}
    if exp:
        print("exporter     " + ", ".join(f"{k} {v}" for k, v in exp.items()))
    print("graphs")
    for precision in model.precisions:
        for graph in ("encoder", "cellfinder", "decoder"):
            path = model.graph_path(graph, precision)
            print(f"  {precision}  {graph:<10}  {path.name:<24} {_size(path):>10}")
            cpu = model.cpu_graph_path(graph, precision)
            if cpu is not None:  # what the CPU backend runs instead (fused attention)
                print(f"  {precision}  {graph:<10}  {cpu.name:<24} {_size(cpu):>10}  (cpu backend)")
    if model.cpu_custom_ops:
        print("cpu kernels  " + ", ".join(model.cpu_custom_ops) + " (cellsam_rt.ops)")
    _print_software()
    return EXIT_OK


def _print_software() -> None:
    """onnxruntime, its providers, and the GPU software present (if any)."""
    from ..backends.onnxruntime import available_providers, onnxruntime_package

    from .. import ops

    print(f"runtime      cellsam-rt {__version__}, {onnxruntime_package()}")
    usable, why = ops.status()
    print(f"kernels      {why}" if usable else f"kernels      not used: {why}")
    try:
        from ..gpuinfo import format_gpu_software
    except ImportError:
        format_gpu_software = None
    if format_gpu_software is not None:  # the full probe: GPUs, driver, CUDA runtime
        print("gpu software")
        for line in format_gpu_software().splitlines():
            print(f"  {line}")
        return
    print(f"providers    {', '.join(available_providers())}")
    gpu = [v for v in (_dist_version("onnxruntime-gpu"),
                       _dist_version("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
                       _dist_version("cuda-python")) if v]
    print(f"gpu software {', '.join(gpu) if gpu else 'none found (CPU only)'}")


# -- run ----------------------------------------------------------------------------------------

def _output_names(paths: Sequence[Path]) -> list[str]:
    """Result base names per input; repeated names get -2, -3, ... so nothing is overwritten."""
    from ..io import output_stem

    names, counts = [], {}
    for path in paths:
        stem = output_stem(path)
        counts[stem] = counts.get(stem, 0) + 1
        names.append(stem if counts[stem] == 1 else f"{stem}-{counts[stem]}")
    return names


def _channel_count(image) -> int:
    """Channels as the reference counts them: the smallest axis of a 3-D image."""
    return 1 if image.ndim == 2 else int(min(image.shape))


def _overlay_image(image, channels):
    """The picked channels in (nuclear, whole-cell) order, for display."""
    from ..preprocess import format_channels

    n = len(channels) if channels else _channel_count(image)
    return format_channels(image, channels)[..., 3 - n:]


def cmd_run(args: argparse.Namespace) -> int:
    """Segment every input; one failing input is reported and the others still run."""
    from ..backends.base import BackendError
    from ..io import (ImageReadError, OutputDirError, expand_inputs, overlay_outlines,
                     prepare_output_dir, read_image, write_labels_tiff, write_png,
                     write_table_csv)
    from ..model_dir import ModelDirError
    from ..progress import ProgressBar
    from ..runner import PipelinedRunner, run_sequential

    inputs = expand_inputs(args.inputs)
    if not inputs:
        error("no inputs")
        return EXIT_USAGE
    if args.boxes is not None and len(inputs) > 1:
        error(f"--boxes gives boxes for one image, but {len(inputs)} inputs were given")
        return EXIT_USAGE
    try:
        out_dir = prepare_output_dir(args.out)
    except OutputDirError as exc:
        error(exc)
        return EXIT_USAGE
    boxes = None
    if args.boxes is not None:
        from ..detect import load_boxes
        try:
            boxes = load_boxes(args.boxes)
        except (ValueError, OSError) as exc:
            error(exc)
            return EXIT_USAGE
    planes = dict(args.plane)

    from ..pipeline import Segmenter

    bar = ProgressBar(len(inputs), enabled=False if args.quiet else None)
    bar_lock = threading.Lock()  # the bar is drawn from the inference thread too

    def sub_progress(*a, **kw) -> None:
        with bar_lock:
            bar.sub_progress(*a, **kw)

    options: dict[str, Any] = dict(model=args.model, backend=args.backend,
                                   precision=args.precision, threads=args.threads,
                                   tile=args.tile, bbox_threshold=args.bbox_threshold,
                                   progress=sub_progress)
    if args.chunk_size is not None:
        options["chunk_size"] = args.chunk_size
    try:
        segmenter = Segmenter(**options)
    except (ModelDirError, BackendError, ValueError) as exc:
        error(exc)
        return EXIT_USAGE

    def say(line: str, failure: bool = False) -> None:
        """A per-image line (stdout), or with failure an error line (stderr, even with --quiet)."""
        with bar_lock:
            bar.clear()  # the bar redraws itself on its next update
            if failure:
                error(line)
            elif not args.quiet:
                print(line, flush=True)

    def prepare(path: Path):
        """Read, check and preprocess one input (on a worker thread when pipelined)."""
        image = read_image(path, axes=args.axes, planes=planes)
        return path, image, segmenter.prepare(image, channels=args.channels)

    def infer(item):
        """Segment one prepared input; images reach this one at a time, in input order."""
        path, image, prepared = item
        with bar_lock:
            bar.start_item(path.name)
        return image, segmenter.segment(image, channels=args.channels, boxes=boxes,
                                        prepared=prepared)

    if args.workers > 0 and len(inputs) > 1:
        results = PipelinedRunner(prepare, infer, workers=args.workers).run(inputs)
    else:
        results = run_sequential(prepare, infer, None, inputs)

    failed = 0
    started = time.perf_counter()
    for res, name in zip(results, _output_names(inputs)):
        path = res.item
        t0 = time.perf_counter()
        try:
            if not res.ok:
                raise res.error
            image, result = res.value
            write_labels_tiff(out_dir / f"{name}_labels.tif", result.labels)
            write_table_csv(out_dir / f"{name}_cells.csv", result.table)
            if args.overlay:
                write_png(out_dir / f"{name}_overlay.png",
                          overlay_outlines(_overlay_image(image, args.channels), result.labels))
        except ImageReadError as exc:
            failed += 1
            say(str(exc), failure=True)
        except Exception as exc:  # noqa: BLE001 - one bad input must not stop the batch
            if args.debug:
                raise
            failed += 1
            reason = str(exc) if isinstance(exc, (ValueError, BackendError, OSError)) \
                else f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
            say(f"{path}: {reason}", failure=True)
        else:
            seconds = sum(res.seconds.values()) + time.perf_counter() - t0
            say(f"{path}: {result.n_cells} cells -> {out_dir / name}_* ({seconds:.2f} s)")
        with bar_lock:
            bar.advance()
    bar.close()
    if not args.quiet:
        ok = len(inputs) - failed
        print(f"{ok} of {len(inputs)} images segmented in {time.perf_counter() - started:.1f} s"
              + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return EXIT_FAILED_INPUTS if failed else EXIT_OK


# -- entry point --------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the `cellsam-rt` command line; returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Output piped into e.g. `head`, which exited: stop quietly, as Unix tools do. Python
        # would otherwise complain again while flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lazy = {cmd.name: cmd for cmd in LAZY_COMMANDS}
    if argv and argv[0] in lazy and _listed(lazy[argv[0]]):
        return _run_lazy(lazy[argv[0]], argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    return cmd_info(args)


if __name__ == "__main__":
    sys.exit(main())
