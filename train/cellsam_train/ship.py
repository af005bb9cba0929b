"""Install a trained small model as the package's default: model dir + checkpoint into the source tree.

    python -m cellsam_train.ship --from RUN_DIR

RUN_DIR is a `python -m cellsam_train --out RUN_DIR` folder (model.pt + model/). The model
directory goes to runtime/cellsam_rt/models/default/ (what `--model default` loads) and the
checkpoint to train/cellsam_train/default_model.pt (for the ONNX-vs-PyTorch parity test).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

__all__ = ["DEFAULT_MODEL_DIR", "DEFAULT_CHECKPOINT", "MAX_MODEL_BYTES", "install_default", "main"]

_REPO = Path(__file__).resolve().parents[3]
DEFAULT_MODEL_DIR = _REPO / "runtime" / "cellsam_rt" / "models" / "default"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "default_model.pt"
MAX_MODEL_BYTES = 30 * 1024 * 1024  # the shipped model directory must stay small


def install_default(run_dir: Path, model_dir: Path = DEFAULT_MODEL_DIR,
                    checkpoint: Path = DEFAULT_CHECKPOINT, note: Optional[str] = None) -> int:
    """Copy RUN_DIR/model/* and RUN_DIR/model.pt into place; returns the model dir's size in bytes.

    `note` (e.g. the measured accuracy) is appended to the installed manifest's description,
    which `cellsam-rt info default` shows.
    """
    src = Path(run_dir) / "model"
    manifest = json.loads((src / "manifest.json").read_text())
    # The small model's fused-attention encoder saves little (its decoder dominates): the
    # package ships the portable graphs only.
    stripped = manifest.pop("cpu_graphs", None) is not None
    files = ["manifest.json"] + sorted({f for graphs in manifest["graphs"].values() for f in graphs.values()})
    size = sum((src / f).stat().st_size for f in files)
    if size > MAX_MODEL_BYTES:
        raise ValueError(f"{src}: {size / 2**20:.1f} MB exceeds the {MAX_MODEL_BYTES / 2**20:.0f} MB budget")
    model_dir.mkdir(parents=True, exist_ok=True)
    for old in model_dir.iterdir():  # stale graphs of a previous model must not linger
        if old.is_file():
            old.unlink()
    for f in files:
        shutil.copy2(src / f, model_dir / f)
    if note:
        manifest["description"] = f"{manifest.get('description', '').rstrip()} {note.strip()}"
    if note or stripped:
        (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.copy2(Path(run_dir) / "model.pt", checkpoint)
    return size


def main(argv: Optional[list[str]] = None) -> int:
    """Command line of install_default."""
    p = argparse.ArgumentParser(prog="python -m cellsam_train.ship", description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="run_dir", required=True, type=Path, help="training output folder")
    p.add_argument("--note", default=None,
                   help="text appended to the model's description (e.g. its measured accuracy)")
    args = p.parse_args(argv)
    size = install_default(args.run_dir, note=args.note)
    print(f"installed {DEFAULT_MODEL_DIR} ({size / 2**20:.1f} MB) and {DEFAULT_CHECKPOINT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
