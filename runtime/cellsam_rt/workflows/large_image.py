"""Images larger than memory: one image segmented block by block (blockwise.py's plan, merge
and numbering) with the block results on disk, written into an OME-Zarr label image.

Passes, each a set of independent tasks (run in this process, or as Dask tasks on a cluster):

1. segment: each block reads its expanded region from the lazy image, segments it, and saves its
   core labels, the strips it shares with its neighbours and its detection scores in one file,
   `<run>/blocks/<image>/<row>_<col>.npz`, written atomically; a rerun skips blocks whose file
   exists (the folder also holds the plan, so a changed plan starts over);
2. match: each shared border compares the two blocks' strips (IoU > 0.5; cells one block missed
   are taken from the other), each block corner its two diagonal pairs;
3. the matches are joined into final numbers 1..K here (a table of K entries in memory);
4. relabel: each block writes its core, renumbered, into a staging OME-Zarr label image and
   returns its cells' statistics (numbers left without pixels are closed up by one more pass);
   lower pyramid levels follow, then the metadata, then one rename puts it in place.

Memory per task is one expanded block and its labels; this process holds the plan, the match
pairs and the per-label table, never an image-sized array.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from cellsam_rt.io import label_store
from cellsam_rt.io.lazy_images import LazyImage
from cellsam_rt.io.outputs import atomic_write, label_dtype
from cellsam_rt.workflows.blockwise import (BlockPlan, assemble_core, border_match,
                                            cached_segmenter, compact_table, corner_link,
                                            label_areas, merge_tables, segment_block)

BLOCKS_DIR = "blocks"
TASK_RETRIES = 2


@dataclasses.dataclass
class BlockJob:
    """What every task of one image needs (small; sent to Dask workers)."""

    image: LazyImage
    plan: BlockPlan
    folder: Path                  # the image's block results
    segmenter: dict               # Segmenter keywords
    channels: tuple | None = None
    skip_empty: bool = True

    def block_file(self, i: int, j: int) -> Path:
        return self.folder / f"{i}_{j}.npz"


# ---------------------------------------------------------------- tasks

def segment_task(job: BlockJob, i: int, j: int) -> tuple[int, int, np.ndarray, int]:
    """Pass 1 for one block: (index, number of labels, (label, pixels) of those in the core,
    the model's smallest cell area)."""
    path = job.block_file(i, j)
    k = job.plan.index(i, j)
    if path.is_file():  # finished by an earlier (killed) run or an earlier try of this task
        with np.load(path) as f:
            return k, int(f["n"]), f["present"], int(f["min_size"])
    y0, y1, x0, x1 = job.plan.expanded(i, j)
    image = job.image.region(slice(y0, y1), slice(x0, x1))
    segmenter, lock = cached_segmenter(job.segmenter)
    with lock:
        labels, scores = segment_block(segmenter, image, job.channels, job.skip_empty)
    cy, cx = job.plan.core_in_expanded(i, j)
    core = labels[cy, cx]
    arrays = {"n": np.int64(len(scores)), "present": label_areas(core), "core": core,
              "scores": scores, "min_size": np.int64(segmenter.min_size)}
    for name, (sy, sx) in job.plan.bands(i, j).items():
        arrays[f"band_{name}"] = labels[sy, sx]

    def write(fh) -> None:
        np.savez_compressed(fh, **arrays)

    atomic_write(path, write)
    return k, int(arrays["n"]), arrays["present"], int(arrays["min_size"])


def match_task(job: BlockJob, a: tuple, band_a: str, b: tuple, band_b: str, axis: int) -> tuple:
    """Pass 2 for one shared border: (block a, matched label pairs, block b, b's labels to fill
    into a's core, a's labels to fill into b's core) (see `border_match`)."""
    with np.load(job.block_file(*a)) as fa, np.load(job.block_file(*b)) as fb:
        pairs, into_a, into_b = border_match(fa[f"band_{band_a}"], fb[f"band_{band_b}"], axis,
                                             job.plan.overlap)
    return job.plan.index(*a), pairs, job.plan.index(*b), into_a, into_b


def corner_task(job: BlockJob, a: tuple, bands_a: tuple, b: tuple, bands_b: tuple) -> tuple:
    """Pass 2 for one diagonal pair of a block corner: the labels matched over the square both
    blocks segmented."""
    squares = []
    for (i, j), bands in ((a, bands_a), (b, bands_b)):
        with np.load(job.block_file(i, j)) as f:
            squares.append(f[f"band_{bands[0]}"][:, job.plan.square(i, j, bands)[1]])
    return corner_link(job.plan.index(*a), squares[0], job.plan.index(*b), squares[1])


def compact_task(job: BlockJob, i: int, j: int, lut: np.ndarray, stage: Path, name: str,
                 layout: label_store.LabelLayout) -> int:
    """Renumber one block of the written labels (only when some numbers ended up unused)."""
    y0, y1, x0, x1 = job.plan.core(i, j)
    arr = label_store.level_array(stage, name)
    index = tuple(slice(y0, y1) if ax == "y" else slice(x0, x1) if ax == "x" else 0
                  for ax in layout.axes)
    block = np.asarray(arr[index])
    label_store.write_region(stage, name, layout, y0, x0, lut.astype(block.dtype)[block])
    return job.plan.index(i, j)


def relabel_task(job: BlockJob, i: int, j: int, table: np.ndarray, fills: list, stage: Path,
                 name: str, layout: label_store.LabelLayout, dtype: str) -> np.ndarray:
    """Pass 4 for one block: its core in final labels, written into the staging label image;
    returns the cell table of the core (image coordinates, final labels, no scores).

    fills: (this block's band, neighbour block, the neighbour's band, its table, its labels to
    take), as `assemble_core` takes them.
    """
    from cellsam_rt.stages.postprocess import cell_table

    with np.load(job.block_file(i, j)) as f:
        core = f["core"]
    loaded = []
    for band, nb, nb_band, nb_table, ids in fills:
        labels = np.zeros((0, 0), np.uint32)
        if np.asarray(ids).size:
            with np.load(job.block_file(*nb)) as f:
                labels = f[f"band_{nb_band}"]
        loaded.append((band, labels, nb_table, ids))
    final = assemble_core(job.plan, i, j, core, table, loaded, np.dtype(dtype))
    y0, y1, x0, x1 = job.plan.core(i, j)
    label_store.write_region(stage, name, layout, y0, x0, final)
    if not final.any():
        return cell_table(final[:1, :1], np.zeros((1, 1, job.image.n_channels)))
    stats = cell_table(final, job.image.region(slice(y0, y1), slice(x0, x1)))
    for c, shift in (("centroid_y", y0), ("centroid_x", x0), ("bbox_min_row", y0),
                     ("bbox_max_row", y0), ("bbox_min_col", x0), ("bbox_max_col", x0)):
        stats[c] += shift
    return stats


# ---------------------------------------------------------------- executors

class LocalExecutor:
    """Runs tasks one after another in this process."""

    def map(self, fn: Callable, calls: Sequence[tuple]) -> Iterable:
        for args in calls:
            yield fn(*args)


class DaskExecutor:
    """Runs tasks on a `distributed` cluster (results as they finish; failed tasks retried)."""

    def __init__(self, client):
        self.client = client

    def map(self, fn: Callable, calls: Sequence[tuple]) -> Iterable:
        from distributed import as_completed

        futures = [self.client.submit(fn, *args, pure=False, retries=TASK_RETRIES)
                   for args in calls]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            self.client.cancel([f for f in futures if not f.done()])


# ---------------------------------------------------------------- one image

@dataclasses.dataclass
class LargeResult:
    dest: Path                     # the label image written
    n_cells: int
    cells: np.ndarray              # cell_table rows of the whole image (final labels)
    blocks: int
    skipped_blocks: int


class Interrupted(Exception):
    """The run was stopped (Ctrl-C / SIGTERM) between tasks."""


def plan_folder(run_dir: Path, key: str, description: dict) -> Path:
    """The image's block folder; emptied when it holds the results of another plan."""
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
    folder = Path(run_dir) / BLOCKS_DIR / f"{Path(key).name[-40:]}-{digest}"
    meta = folder / "plan.json"
    text = json.dumps(description, sort_keys=True, default=str)
    if folder.exists() and (not meta.is_file() or meta.read_text() != text):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not meta.is_file():
        atomic_write(meta, lambda fh: fh.write(text.encode("utf-8")))
    return folder


def segment_large(job: BlockJob, dest_store: Path, dest_path: str, name: str,
                  layout: label_store.LabelLayout, executor=None, quiet: bool = True,
                  stop: threading.Event | None = None) -> LargeResult:
    """Segment one lazy image blockwise into `<dest_store>/<dest_path>/labels/<name>`."""
    from tqdm import tqdm

    executor = executor or LocalExecutor()
    stop = stop or threading.Event()
    plan = job.plan
    blocks = list(plan)
    counts = [0] * len(plan)
    present: list[np.ndarray] = [np.zeros((0, 2), np.int64)] * len(plan)
    min_size = 0
    bar = tqdm(total=len(blocks), unit="block", disable=True if quiet else None, leave=False,
               dynamic_ncols=True, file=sys.stderr, desc=Path(job.image.key).name[-30:])
    try:
        for k, n, p, min_size in executor.map(segment_task, [(job, i, j) for i, j in blocks]):
            counts[k], present[k] = n, p
            bar.update(1)
            if stop.is_set():
                raise Interrupted()
    finally:
        bar.close()
    links = list(executor.map(match_task, [(job, *border) for border in plan.borders()]))
    corners = list(executor.map(corner_task, [(job, *c) for c in plan.corners()]))
    finals = merge_tables(counts, present, links + corners, min_size)
    n_cells = max((int(t.max()) for t in finals if t.size), default=0)
    dtype = np.dtype(label_dtype(n_cells)).str
    stage = job.folder / "stage.zarr"
    label_store.create_labels(stage, name, layout, dtype, label_store.chunk_for(plan.block))
    fills: dict[int, list] = {k: [] for k in range(len(plan))}
    for ka, _, kb, into_a, into_b in links:
        a, b = blocks[ka], blocks[kb]
        band_a, band_b = ("right", "left") if a[0] == b[0] else ("bottom", "top")
        fills[ka].append((band_a, b, band_b, finals[kb], into_a))
        fills[kb].append((band_b, a, band_a, finals[ka], into_b))
    calls = [(job, i, j, finals[plan.index(i, j)], fills[plan.index(i, j)], stage, name, layout,
              dtype) for i, j in blocks]
    pieces = []
    for stats in executor.map(relabel_task, calls):
        pieces.append(stats)
        if stop.is_set():
            raise Interrupted()
    cells = combine_cells(pieces, n_cells, block_scores(job, finals, n_cells))
    lut = compact_table([cells["label"][cells["area"] > 0]])
    if len(lut) - 1 != n_cells or (lut[1:] != np.arange(1, n_cells + 1)).any():
        list(executor.map(compact_task, [(job, i, j, lut, stage, name, layout)
                                         for i, j in blocks]))
        cells = cells[cells["area"] > 0]
        cells["label"] = lut[cells["label"]]
        n_cells = len(cells)
    label_store.build_pyramid(stage, name, layout)
    label_store.finish_labels(stage, name, layout)
    dest = label_store.commit_labels(stage, name, dest_store, dest_path, layout)
    shutil.rmtree(job.folder, ignore_errors=True)
    try:
        job.folder.parent.rmdir()  # the run's blocks/ folder, once no image needs it
    except OSError:
        pass
    return LargeResult(dest, n_cells, cells, len(blocks), sum(1 for n in counts if n == 0))


def block_scores(job: BlockJob, finals: list[np.ndarray], n_cells: int) -> np.ndarray:
    """Detection score of each final label (index = label): the best of its blocks' scores."""
    score = np.full(n_cells + 1, -np.inf)
    for i, j in job.plan:
        k = job.plan.index(i, j)
        if finals[k].size:
            with np.load(job.block_file(i, j)) as f:
                np.fmax.at(score, finals[k], f["scores"].astype(np.float64))
    score[0] = -np.inf
    return np.where(np.isfinite(score), score, np.nan)


def combine_cells(pieces: list[np.ndarray], n_cells: int, scores: np.ndarray) -> np.ndarray:
    """The whole image's cell table from the blocks' tables: sums, minima and maxima of the
    pieces of each label (a cell split over blocks has one piece per block)."""
    dtype = pieces[0].dtype
    out = np.zeros(n_cells, dtype=dtype)
    area = np.zeros(n_cells + 1)
    sums = {c: np.zeros(n_cells + 1) for c in dtype.names
            if c.startswith(("centroid_", "mean_intensity_"))}
    big = np.iinfo(np.int64).max
    lo_r, lo_c = np.full(n_cells + 1, big), np.full(n_cells + 1, big)
    hi_r, hi_c = np.zeros(n_cells + 1, np.int64), np.zeros(n_cells + 1, np.int64)
    for stats in pieces:
        ids = stats["label"]
        a = stats["area"].astype(np.float64)
        np.add.at(area, ids, a)
        for c in sums:
            np.add.at(sums[c], ids, stats[c] * a)
        np.minimum.at(lo_r, ids, stats["bbox_min_row"])
        np.minimum.at(lo_c, ids, stats["bbox_min_col"])
        np.maximum.at(hi_r, ids, stats["bbox_max_row"])
        np.maximum.at(hi_c, ids, stats["bbox_max_col"])
    out["label"] = np.arange(1, n_cells + 1)
    out["area"] = area[1:].astype(np.int64)
    for c, s in sums.items():
        out[c] = s[1:] / np.maximum(area[1:], 1)
    out["bbox_min_row"], out["bbox_min_col"] = lo_r[1:], lo_c[1:]
    out["bbox_max_row"], out["bbox_max_col"] = hi_r[1:], hi_c[1:]
    out["score"] = scores[1:]
    return out


__all__ = ["BLOCKS_DIR", "BlockJob", "DaskExecutor", "Interrupted", "LargeResult",
           "LocalExecutor", "combine_cells", "plan_folder", "segment_large"]
