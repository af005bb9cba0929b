#!/usr/bin/env python3
"""Fields/s of `cellsam-rt run` on an HCS plate, against 24 separate single-image invocations and
against a plain loop without overlap (`--workers 0`), as ratios.

    python benchmarks/bench_plates.py [--fields-size 256] [--rounds 2] [--json out.json]

The plate (2 rows x 4 columns x 3 fields = 24 fields, two channels, NGFF 0.4) is written with
ome-zarr-py from crops of the DSB 2018 nuclei image (tests/data/stardist/img2d.tif). Every mode
runs as real `python -m cellsam_rt.cli run` processes with the same options and writes the same
outputs (labels into a mirrored store under --out, the run table); so process start and model
loading count where the user pays them. Modes alternate per round so that load drift on a shared
machine hits all alike; the median per mode is reported.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "workflows"))

ROWS, COLS, FIELDS = ("A", "B"), ("1", "2", "3", "4"), ("0", "1", "2")
OPTIONS = ["--channels", "DAPI", "--quiet"]


def make_plate(path: Path, size: int) -> Path:
    from screening_helpers import make_plate as _make

    return _make(path, "0.4", rows=ROWS, cols=COLS, fields=FIELDS, size=size)


def cli(*args) -> float:
    """Wall seconds of one `cellsam-rt` process; fails loudly on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cellsam_rt.cli", *map(str, args)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cellsam-rt {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return time.perf_counter() - t0


def run_engine(plate: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    return cli("run", plate, "--out", out, "--workers", workers, *OPTIONS)


def run_separately(plate: Path, out: Path) -> float:
    """One process per field (the field's image group is a single OME-Zarr image)."""
    shutil.rmtree(out, ignore_errors=True)
    total = 0.0
    for r in ROWS:
        for c in COLS:
            for f in FIELDS:
                total += cli("run", plate / r / c / f, "--out", out / f"{r}{c}_{f}", *OPTIONS)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields-size", type=int, default=256, help="field side in pixels (256)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    n = len(ROWS) * len(COLS) * len(FIELDS)
    with tempfile.TemporaryDirectory(prefix="bench_plates_") as tmp:
        tmp = Path(tmp)
        plate = make_plate(tmp / "plate.zarr", args.fields_size)
        cli("run", plate / "A/1/0", "--out", tmp / "warm", *OPTIONS)  # warm the file cache
        seconds: dict[str, list[float]] = {"engine": [], "separate": [], "plain_loop": []}
        for rnd in range(args.rounds):
            seconds["engine"].append(run_engine(plate, tmp / "engine", workers=1))
            seconds["plain_loop"].append(run_engine(plate, tmp / "loop", workers=0))
            seconds["separate"].append(run_separately(plate, tmp / "separate"))
            print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s"
                                                  for k, v in seconds.items()), flush=True)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    rate = {k: n / v for k, v in med.items()}
    result = {
        "fields": n, "field_size": args.fields_size, "rounds": args.rounds,
        "seconds": seconds, "fields_per_s": rate,
        "engine_vs_separate": rate["engine"] / rate["separate"],
        "engine_vs_plain_loop": rate["engine"] / rate["plain_loop"],
    }
    print(f"{n} fields of {args.fields_size}^2: engine {rate['engine']:.2f} fields/s, "
          f"plain loop {rate['plain_loop']:.2f}, separate invocations {rate['separate']:.2f}; "
          f"engine / separate = {result['engine_vs_separate']:.2f}x, "
          f"engine / plain loop = {result['engine_vs_plain_loop']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
