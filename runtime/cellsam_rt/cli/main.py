"""The `cellsam-rt` command: a registry of subcommands, one module each, imported only when run.

A command module provides `add_arguments(parser)` and `run(args) -> int`. Built-in commands are
listed in COMMANDS; other installed packages add theirs through the entry-point group
`cellsam_rt.commands` (the PyTorch side registers `export` this way), so the runtime names no
other package.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Sequence

from cellsam_rt import __version__

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2
ENTRY_POINT_GROUP = "cellsam_rt.commands"


@dataclass(frozen=True)
class Command:
    """A subcommand whose module is imported only when that subcommand runs."""

    name: str
    module: str
    help: str
    add_arguments: str = "add_arguments"
    run: str = "run"
    always_listed: bool = False  # list it even when its module (or its extra) is missing
    install_hint: str = ""       # said when the module's dependencies are missing
    plugin: bool = False         # registered by another package (help read from its module)


COMMANDS = [
    Command("run", "cellsam_rt.cli.run", "segment images"),
    Command("info", "cellsam_rt.cli.info", "describe a model and the inference software"),
    Command("watch", "cellsam_rt.cli.watch",
            "segment images as they appear in a folder or a growing plate"),
    Command("track", "cellsam_rt.cli.track",
            "segment a time-lapse and link cells over time (divisions, lineages)"),
    Command("track-score", "cellsam_rt.cli.track_score",
            "score tracking results against ground truth (CTC format)"),
    Command("spots", "cellsam_rt.cli.spots",
            "assign RNA spots to cells: per-spot cell ids and a cell x gene matrix"),
    Command("napari", "cellsam_rt.cli.napari", "open napari with the cellsam-rt plugin docked"),
    Command("evaluate", "cellsam_rt.cli.evaluate", "score segmentations against ground truth"),
    Command("bench", "cellsam_rt.cli.bench", "measure latency and throughput"),
    Command("quantize", "cellsam_rt.cli.quantize",
            "add INT8 (dynamically quantised) trunks to a model, for CPU inference"),
    Command("build-engines", "cellsam_rt.cli.build_engines",
            "build TensorRT engines for a model on this machine's GPU"),
]


def plugin_commands() -> list[Command]:
    """Commands other installed packages register under the `cellsam_rt.commands` group.

    The entry point names a module; its `COMMAND_HELP` and `INSTALL_HINT` strings describe it.
    They are read (by importing the module, which imports nothing heavy) only for --help and
    for error messages, so running a command costs no plugin import."""
    return [Command(ep.name, ep.value.partition(":")[0], help="", always_listed=True,
                    plugin=True)
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]


def _plugin_attr(module: str, name: str, default: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), name, default))
    except ImportError:
        return default


def command_help(cmd: Command) -> str:
    """The one-line help of `cmd` (a plugin's is read from its module)."""
    if not cmd.plugin:
        return cmd.help
    return _plugin_attr(cmd.module, "COMMAND_HELP", f"{cmd.name} (from {cmd.module.split('.')[0]})")


def install_hint(cmd: Command) -> str:
    """What to install when the command's optional dependencies are missing ("" if unknown)."""
    return cmd.install_hint or (_plugin_attr(cmd.module, "INSTALL_HINT", "") if cmd.plugin else "")


def all_commands() -> list[Command]:
    """Built-in commands, then those of installed plugins."""
    return COMMANDS + plugin_commands()


def module_exists(name: str) -> bool:
    """True if `name` can be imported, without importing it (its parent package is imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def listed(cmd: Command) -> bool:
    """Whether `cmd` appears in --help: its module exists, or it is always listed."""
    return cmd.always_listed or module_exists(cmd.module)


def error(message: object) -> None:
    """Print a one-line error for the user on stderr."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)


def build_parser(commands: Sequence[Command]) -> argparse.ArgumentParser:
    """The top-level parser; each command parses its own options (see run_command)."""
    parser = argparse.ArgumentParser(
        prog="cellsam-rt", description="Fast, torch-free CellSAM cell segmentation.")
    parser.add_argument("--version", action="version", version=f"cellsam-rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in commands:
        if listed(cmd):
            sub.add_parser(cmd.name, help=command_help(cmd), add_help=False)
    return parser


def run_command(cmd: Command, argv: Sequence[str]) -> int:
    """Import the command's module, parse its arguments and run it."""
    from cellsam_rt.errors import CellsamRtError

    try:
        module = importlib.import_module(cmd.module)
    except ModuleNotFoundError as exc:
        if exc.name == cmd.module:
            error(f"`cellsam-rt {cmd.name}` is not available in this installation ({exc})")
        else:  # an optional dependency of the command (an extra) is missing
            hint = f": {install_hint(cmd)}" if install_hint(cmd) else ""
            error(f"`cellsam-rt {cmd.name}` needs {exc.name}, which is not installed{hint}")
        return EXIT_USAGE
    parser = argparse.ArgumentParser(prog=f"cellsam-rt {cmd.name}", description=command_help(cmd))
    getattr(module, cmd.add_arguments)(parser)
    args = parser.parse_args(list(argv))
    try:
        return int(getattr(module, cmd.run)(args) or 0)
    except CellsamRtError as exc:
        # Commands read files: a bad one is a one-line error, not a traceback.
        error(exc)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:  # a dependency imported only once the command runs
        if install_hint(cmd) and exc.name and module_exists(cmd.module):
            error(f"`cellsam-rt {cmd.name}` needs {exc.name}: {install_hint(cmd)}")
            return EXIT_USAGE
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `cellsam-rt` command line; returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Output piped into e.g. `head`, which exited: stop quietly, as Unix tools do. Python
        # would otherwise complain again while flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = all_commands()
    by_name = {cmd.name: cmd for cmd in commands}
    if argv and argv[0] in by_name and listed(by_name[argv[0]]):
        return run_command(by_name[argv[0]], argv[1:])
    build_parser(commands).parse_args(argv)  # --help, --version, or a usage error (exit 2)
    return EXIT_USAGE
