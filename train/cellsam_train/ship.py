"""Install a trained small model as the package's default: model dir + checkpoint into the source tree.

    python -m cellsam_train.ship --from RUN_DIR

RUN_DIR is a `python -m cellsam_train --out RUN_DIR` folder (model.pt + model/). The model
directory goes to runtime/cellsam_rt/models/default/ (what `--model default` loads) and the
checkpoint to train/cellsam_train/default_model.pt (for the ONNX-vs-PyTorch parity test).

The installed manifest states the model's `object_diameter`: the median nucleus diameter (model
input px) at the core of the training distribution, which the runtime rescales images towards
(synthetic generator version 4: `synth_v4.OBJECT_DIAMETER`). Its description says what the
model was trained on (from the run's train.log settings), with the credit real data needs.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

__all__ = ["DEFAULT_MODEL_DIR", "DEFAULT_CHECKPOINT", "MAX_MODEL_BYTES", "install_default",
           "run_settings", "describe_run", "describe_tuned", "main"]

_REPO = Path(__file__).resolve().parents[2]  # train/cellsam_train/ship.py -> the repository
DEFAULT_MODEL_DIR = _REPO / "runtime" / "cellsam_rt" / "models" / "default"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "default_model.pt"
MAX_MODEL_BYTES = 30 * 1024 * 1024  # the shipped model directory must stay small


MNFINDER_CREDIT = (
    "Real training images: the training split of mnfinder 1.2.3's nucleus images and masks "
    "(Copyright 2023 Lucian DiPeso, Hatch lab; MIT licence; https://github.com/hatch-lab/mnfinder).")


def run_settings(run_dir: Path, log_name: str = "train.log") -> dict:
    """The last `settings: {...}` and `command: ...` of RUN_DIR/log_name ({} without the log;
    train.log of the main training, tune.log of window_tune)."""
    log = Path(run_dir) / log_name
    out: dict = {}
    if not log.exists():
        return out
    for line in log.read_text().splitlines():
        m = re.search(r"\] settings: (\{.*\})$", line)
        if m:
            out.update(json.loads(m.group(1)))
        m = re.search(r"\] command: (.*)$", line)
        if m:
            out["command"] = m.group(1)
    return out


def describe_run(settings: dict) -> str:
    """The model description for a run's settings (training data named, real data credited)."""
    from .train import DESCRIPTION

    version = int(settings.get("synth_version", 3))
    real = float(settings.get("real_fraction", 0.0)) > 0 and "--real-data" in settings.get("command", "")
    if not real:
        return DESCRIPTION
    data = (f"on synthetic (procedurally generated, generator version {version}) fluorescence "
            f"images and real labelled nuclei images ({real_pct(settings)} of the examples)")
    text = DESCRIPTION.replace("on synthetic (procedurally generated) fluorescence images only", data)
    return f"{text} {MNFINDER_CREDIT}"


def describe_tuned(tune: dict) -> str:
    """The description of a model whose mask decoder `window_tune` fine-tuned (its trunks are
    the installed model's)."""
    from .train import DESCRIPTION

    real = float(tune.get("real_fraction", 0.0)) > 0
    data = (f"synthetic images (generator version {int(tune.get('synth_version', 4))})"
            + (f" and real labelled nuclei images ({real_pct(tune)} of the examples)" if real else ""))
    text = DESCRIPTION.replace(
        "(python -m cellsam_train).",
        f"(python -m cellsam_train); its mask decoder was then fine-tuned for windowed decoding "
        f"on {data} with python -m cellsam_train.window_tune (docs/training.md).")
    return f"{text} {MNFINDER_CREDIT}" if real else text


def real_pct(settings: dict) -> str:
    return f"{float(settings.get('real_fraction', 0.0)):.0%}"


def install_default(run_dir: Path, model_dir: Path = DEFAULT_MODEL_DIR,
                    checkpoint: Path = DEFAULT_CHECKPOINT, note: Optional[str] = None,
                    object_diameter: Optional[float] = None) -> int:
    """Copy RUN_DIR/model/* and RUN_DIR/model.pt into place; returns the model dir's size in bytes.

    The description is set from the run's settings (`describe_run`); `note` (e.g. the measured
    accuracy) is appended to it, which `cellsam-rt info default` shows. `object_diameter`
    (default: version 4's core median for runs on generator 4, else none) goes into the manifest,
    and outline "contrast".
    """
    src = Path(run_dir) / "model"
    manifest = json.loads((src / "manifest.json").read_text())
    settings = run_settings(run_dir)
    tune = run_settings(run_dir, "tune.log")
    if tune:
        # A window_tune run keeps the installed model's trunks, so its object scale too.
        installed = Path(model_dir) / "manifest.json"
        if installed.exists():
            kept = json.loads(installed.read_text())
            if object_diameter is None:
                object_diameter = kept.get("object_diameter")
            if "box_diameter_ratio" in kept:  # its detector, so its boxes too
                manifest["box_diameter_ratio"] = kept["box_diameter_ratio"]
    elif object_diameter is None and int(settings.get("synth_version", 0)) >= 4:
        from .synth_v4 import OBJECT_DIAMETER

        object_diameter = OBJECT_DIAMETER
    if object_diameter is not None:
        manifest["object_diameter"] = round(float(object_diameter), 1)
    # The small decoder's outlines sit a pixel off the edge on real images, and it takes faint
    # haze for cells: its masks are read against the image (runtime stages/outline.py;
    # docs/performance.md, "Masks read against the image").
    manifest["outline"] = "contrast"
    if tune:
        manifest["description"] = describe_tuned(tune)
    elif settings:
        manifest["description"] = describe_run(settings)
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
    (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.copy2(Path(run_dir) / "model.pt", checkpoint)
    return size


def main(argv: Optional[list[str]] = None) -> int:
    """Command line of install_default."""
    p = argparse.ArgumentParser(prog="python -m cellsam_train.ship", description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="run_dir", required=True, type=Path, help="training output folder")
    p.add_argument("--note", default=None,
                   help="text appended to the model's description (e.g. its measured accuracy)")
    p.add_argument("--object-diameter", type=float, default=None, metavar="PX",
                   help="median object diameter (model input px) written to the manifest "
                        "(default: the training generator's, for version 4 runs)")
    args = p.parse_args(argv)
    size = install_default(args.run_dir, note=args.note, object_diameter=args.object_diameter)
    print(f"installed {DEFAULT_MODEL_DIR} ({size / 2**20:.1f} MB) and {DEFAULT_CHECKPOINT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
