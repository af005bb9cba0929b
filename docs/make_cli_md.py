"""Regenerate docs/cli.md's command reference from the commands' own --help.

    python docs/make_cli_md.py

The text above "## Commands" in docs/cli.md is kept as written; everything from there on is
rewritten: one section per command listed by `cellsam-rt --help`, a few sentences from ABOUT
below and the command's --help at 100 columns. A command without an entry in ABOUT is an error,
so a new command cannot go undocumented.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cellsam_rt.cli.main import all_commands, listed

CLI_MD = Path(__file__).resolve().parent / "cli.md"
MARKER = "\n## Commands\n"
ABOUT = {
    "run": "Segment image files, folders, globs, OME-Zarr images and HCS plates with the shipped "
           "or an exported model: per image a label TIFF and a cell table, plus the run's table "
           "and ledger, so an interrupted run resumes where it stopped. A bad input is reported "
           "as one line naming the file, the others are still processed, and the exit status "
           "is 1. `--scheduler` spreads the images over a Dask cluster "
           "([distributed.md](distributed.md)); `--spots` assigns a spots table to the cells "
           "of one image ([spots.md](spots.md)). See [screening.md](screening.md) for plates "
           "and OME-Zarr.",
    "info": "Print a model directory's manifest, graphs and sizes, and the inference software "
            "found: ONNX Runtime and its providers, the CPU kernel path, GPU, driver, TensorRT, "
            "cuda-python.",
    "watch": "Segment images as they appear in a folder, or fields as they appear in a growing "
             "OME-Zarr plate, with the options of `run`; an image is taken once it has stopped "
             "changing. See [screening.md](screening.md).",
    "track": "Segment every frame of a time-lapse (or take its labels with `--labels`) and link "
             "the cells over time, with divisions and gap closing; writes the Cell Tracking "
             "Challenge format, a tracks table and the lineage. See [tracking.md](tracking.md).",
    "track-score": "Score a tracking result against ground truth with the Cell Tracking "
                   "Challenge metrics (py-ctcmetrics). See [tracking.md](tracking.md).",
    "spots": "Assign RNA spots (x, y, gene) to the cells of a label image, or segment the spots' "
             "density when there is no stain; writes the spots with their cell, an AnnData "
             "cell x gene matrix and a counts CSV. See [spots.md](spots.md).",
    "napari": "Open napari with the cellsam-rt Segment widget docked and the given images or "
              "results loaded. See [napari.md](napari.md).",
    "evaluate": "Segment an image (or read a prediction with `--pred`) and score it against a "
                "ground-truth label image: one-to-one matching, F1 at IoU 0.5/0.75/0.9, "
                "precision, recall, mean matched IoU; `--baseline` scores Otsu + watershed "
                "beside it.",
    "bench": "Time the pipeline stage by stage on one image (median and p95 per stage, images/s, "
             "decoder boxes/s, peak RSS), optionally with the PyTorch reference in the same "
             "process for ratios (`--reference`, needs the `[export]` extra). The JSON record "
             "names the CPU, cores, SIMD flags, load, backend, precision, threads and package "
             "versions. Figures: [performance.md](performance.md).",
    "quantize": "Add INT8 (dynamically quantised) encoder and CellFinder graphs to a model "
                "directory, for `--precision int8` on the CPU; the mask decoder stays FP32. "
                "Check parity on your data before relying on it "
                "([performance.md](performance.md#int8)).",
    "build-engines": "Build native TensorRT engines for a model on this machine's GPU, for "
                     "`--backend tensorrt`. See [gpu.md](gpu.md).",
    "export": "Export a CellSAM checkpoint (e.g. the official `cellsam_general.pt`, v1.2; "
              "loading is strict) to a model directory: FP32 and FP16 graphs, the CPU trunks "
              "with cellsam-rt's attention kernel, and the manifest ([formats.md](formats.md)). "
              "Needs the `[export]` extra (PyTorch).",
}


def help_text(name: str) -> str:
    """The command's --help as a user sees it in a 100-column terminal."""
    env = dict(os.environ, COLUMNS="100")
    return subprocess.run([sys.executable, "-m", "cellsam_rt.cli", name, "--help"], env=env,
                          capture_output=True, text=True, check=True).stdout.rstrip()


def main() -> int:
    """Rewrite the command sections of docs/cli.md."""
    cmds = [c for c in all_commands() if listed(c)]
    missing = [c.name for c in cmds if c.name not in ABOUT]
    if missing:
        print(f"error: no description in ABOUT for {', '.join(missing)}", file=sys.stderr)
        return 1
    head = CLI_MD.read_text(encoding="utf-8").split(MARKER)[0]
    parts = [head.rstrip() + "\n", MARKER, "\n"]
    parts.append("\n".join(f"- [`{c.name}`](#{c.name}): {c.help}" for c in cmds) + "\n")
    for c in cmds:
        parts.append(f"\n### {c.name}\n\n{ABOUT[c.name]}\n\n```text\n{help_text(c.name)}\n```\n")
    CLI_MD.write_text("".join(parts), encoding="utf-8")
    print(f"wrote {CLI_MD}: {', '.join(c.name for c in cmds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
