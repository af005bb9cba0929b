#!/usr/bin/env python3
"""Images larger than memory: peak resident memory and speed of blockwise `cellsam-rt run` on
sparse synthetic OME-Zarr images (uint16, mostly background, a few patches of nuclei).

    python benchmarks/bench_large_image.py memory [--sizes 8192 16384] [--json out.json]
    python benchmarks/bench_large_image.py workers [--size 4096 --block 1024] [--json out.json]

`memory`: one `cellsam-rt run` process per image size (default block 2048, overlap 96), its
peak resident memory (the process and its children, sampled every 0.1 s with psutil) and wall
time. The same nuclei patches are planted in every size, so the work that grows with the size is
reading (and skipping) empty blocks; the memory should not grow.

`workers`: the same image through `--scheduler local:1` and `local:2` (Dask LocalClusters), in
Mpx/s of image area; each worker gets cores // N ONNX Runtime threads.

The images are written chunk by chunk from a Dask array with ome-zarr-py (never whole in memory):
Gaussian noise (mean 100, sigma 10) plus filled discs (radius 12, +900) in 2 patches of 24 x 24
nuclei each, 60 px apart.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PATCH_NUCLEI = 24       # per side of a patch
SPACING = 60
RADIUS = 12
CHUNK = 1024


def patch_origins(size: int) -> list[tuple[int, int]]:
    """One patch inside a block, one across a block corner (at 4096, 4096): in the top-left
    8k of every size, so every size has the same cells."""
    return [(300, 300), (3500, 3500)] if size >= 8192 else \
        [(100, 100), (size // 2 - 448, size // 2 - 448)]


def _chunk(block: np.ndarray, block_info=None) -> np.ndarray:
    (y0, y1), (x0, x1) = block_info[None]["array-location"]
    size = block_info[None]["shape"][0]
    rng = np.random.default_rng(y0 * 7919 + x0)
    out = rng.normal(100, 10, (y1 - y0, x1 - x0))
    yy, xx = np.ogrid[y0:y1, x0:x1]
    for py, px in patch_origins(size):
        for i in range(PATCH_NUCLEI):
            for j in range(PATCH_NUCLEI):
                cy, cx = py + i * SPACING, px + j * SPACING
                if y0 - RADIUS <= cy < y1 + RADIUS and x0 - RADIUS <= cx < x1 + RADIUS:
                    out[(yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS ** 2] += 900
    return np.clip(out, 0, 65535).astype(np.uint16)


def make_image(path: Path, size: int) -> Path:
    """A size x size YX OME-Zarr image (NGFF 0.4, 1024-px chunks), written chunk by chunk."""
    import dask
    import dask.array as da
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    lazy = da.zeros((size, size), dtype=np.uint16, chunks=CHUNK).map_blocks(_chunk,
                                                                           dtype=np.uint16)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    with dask.config.set(scheduler="threads", num_workers=2):
        write_image(lazy, root, axes="yx", fmt=FormatV04(), scale_factors=(),
                    storage_options={"chunks": (CHUNK, CHUNK)})
    return path


def run_measured(args: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB, the process plus its children) of one CLI process."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "cellsam_rt.cli", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss
                                                 for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.1)

    t0 = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"run {' '.join(args)} failed:\n{err}")
    return {"seconds": seconds, "peak_rss_mib": peak / 2**20, "stdout": out.strip()}


def memory(a, tmp: Path) -> list[dict]:
    rows = []
    cores = os.cpu_count() or 1
    for size in a.sizes:
        image = make_image(tmp / f"img{size}.zarr", size)
        out = tmp / f"out{size}"
        res = run_measured([str(image), "--out", str(out), "--threads", str(cores),
                            "--block", str(a.block)])
        mb = size * size * 2 / 2**20
        row = {"size": size, "image_mib": mb, "block": a.block, **res}
        print(f"{size:6d}^2 ({mb:6.0f} MiB): {res['seconds']:7.1f} s, peak RSS "
              f"{res['peak_rss_mib']:6.0f} MiB  [{res['stdout']}]", flush=True)
        rows.append(row)
        shutil.rmtree(image)
        shutil.rmtree(out)
    return rows


def workers(a, tmp: Path) -> list[dict]:
    cores = os.cpu_count() or 1
    image = make_image(tmp / "img.zarr", a.size)
    rows = []
    for n in (1, 2):
        out = tmp / f"out{n}"
        res = run_measured([str(image), "--out", str(out), "--blockwise", "--block",
                            str(a.block), "--scheduler", f"local:{n}", "--threads",
                            str(max(1, cores // n))])
        mpx = a.size * a.size / 1e6
        row = {"workers": n, "size": a.size, "block": a.block, "mpx_per_s": mpx / res["seconds"],
               **res}
        print(f"local:{n}: {res['seconds']:7.1f} s, {mpx / res['seconds']:6.2f} Mpx/s, peak RSS "
              f"{res['peak_rss_mib']:6.0f} MiB  [{res['stdout']}]", flush=True)
        rows.append(row)
        shutil.rmtree(out)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("memory", "workers"))
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--block", type=int, default=None)
    p.add_argument("--tmp", type=Path, default=None, help="folder for the images (default: a "
                   "temporary folder)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    a.block = a.block or (2048 if a.what == "memory" else 1024)
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        rows = (memory if a.what == "memory" else workers)(a, Path(tmp))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
