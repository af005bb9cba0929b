"""`cellsam-rt export`: checkpoint -> model directory. Registered with the runtime's command line
through the `cellsam_rt.commands` entry point, imported only when the command runs.

This module imports nothing heavy at import time, so that the runtime's CLI can build its
argument parser, and report a missing torch in one line, without the [export] extra installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

__all__ = ["add_export_arguments", "run_export", "main"]

_EXPORT_DEPS = ("torch", "onnx", "onnxscript", "onnxconverter_common", "segment_anything")
INSTALL_HINT = "pip install 'cellsam-rt[export]'"
COMMAND_HELP = f"export a CellSAM checkpoint to a model directory (needs PyTorch: {INSTALL_HINT})"
_find_spec = importlib.util.find_spec  # a module attribute so tests can simulate a missing torch


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `export` subcommand's options to `parser`."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, metavar="FILE",
                     help="CellSAM checkpoint (.pt state dict, e.g. cellsam_general.pt)")
    src.add_argument("--random-weights", metavar="CONFIG",
                     help="export a random-weight model of a named config instead (tests, demos, "
                          "benchmarks), e.g. 'full' or 'tiny'")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="model directory to write (manifest.json + ONNX graphs)")
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                        help="also write FP16 graphs (*.fp16.onnx; default: yes)")
    parser.add_argument("--cpu-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also write the ONNX Runtime CPU trunks with fused attention "
                             "(*.cpu.onnx, used by --backend cpu; default: yes)")
    parser.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="the CPU trunks' global attention on cellsam-rt's own kernel "
                             "(com.cellsam.RelPosAttention, faster than ONNX Runtime's attention "
                             "there; needs cellsam_rt.kernels where they run; --no-cpu-kernels: "
                             "ONNX Runtime ops only; default: yes)")
    parser.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX opset (default 18)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists (after success)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-weights (default 0)")
    parser.add_argument("--with-model-cp", action="store_true",
                        help="with --random-weights: include the model_cp SAM copy")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    return parser


def _error(msg: str) -> int:
    """Print a one-line error for the user and return the usage-error exit status."""
    print(f"cellsam-rt export: error: {msg}", file=sys.stderr)
    return 2


def _missing_export_deps() -> list[str]:
    """Export-only packages that are not installed."""
    return [m for m in _EXPORT_DEPS if _find_spec(m) is None]


def _random_model(config: str, with_model_cp: bool, seed: int):
    """A random-weight CellSAM of a named config and the info dict export_model_dir records."""
    from cellsam_export.build import build_cellsam, resolve_config
    from cellsam_export.checkpoint import random_state_dict

    cfg = resolve_config(config)
    model = build_cellsam(cfg, with_model_cp=with_model_cp)
    model.load_state_dict(random_state_dict(cfg, with_model_cp=with_model_cp, seed=seed), strict=True)
    info = {"path": None, "sha256": None, "has_model_cp": with_model_cp, "config": cfg,
            "config_name": config, "random_seed": seed}
    return model.eval(), info


def run_export(args: argparse.Namespace) -> int:
    """Run an export from parsed arguments; return the process exit status."""
    missing = _missing_export_deps()
    if missing:
        return _error(f"exporting needs {', '.join(missing)}: {INSTALL_HINT}")
    out = Path(args.out)
    if out.exists() and not args.force:
        return _error(f"{out} already exists (use --force to replace it)")
    if args.opset < 18:
        return _error(f"--opset {args.opset} is too old: the exporter needs opset 18 or newer")
    say = (lambda _m: None) if getattr(args, "quiet", False) else (lambda m: print(m, file=sys.stderr))

    from cellsam_export.checkpoint import CheckpointError, load_checkpoint
    from cellsam_export.onnx_export import ExportError, export_model_dir

    t0 = time.perf_counter()
    if args.random_weights:
        from cellsam_export.build import CONFIGS

        if args.random_weights not in CONFIGS:
            return _error(f"unknown config {args.random_weights!r} (known: {', '.join(sorted(CONFIGS))})")
        say(f"building random-weight '{args.random_weights}' model (seed {args.seed}) ...")
        loaded = _random_model(args.random_weights, args.with_model_cp, args.seed)
    else:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_file():
            return _error(f"checkpoint file not found: {ckpt}")
        say(f"loading {ckpt} ...")
        try:
            loaded = load_checkpoint(ckpt)
        except CheckpointError as exc:
            return _error(_one_line(exc))  # already names the file and the problem
    say(f"loaded in {time.perf_counter() - t0:.1f} s")
    try:
        export_model_dir(loaded, out, fp16=args.fp16, opset=args.opset, force=args.force,
                         progress=say, cpu_graphs=args.cpu_graphs,
                         cpu_kernels=args.cpu_kernels)
    except ExportError as exc:
        return _error(_one_line(exc))
    say(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m cellsam_export.export_cli`)."""
    parser = argparse.ArgumentParser(prog="cellsam-rt export", description=__doc__.splitlines()[0])
    add_export_arguments(parser)
    return run_export(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


# The runtime's command registry calls every command module's add_arguments / run.
add_arguments = add_export_arguments
run = run_export
