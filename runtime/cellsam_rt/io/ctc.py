"""Cell Tracking Challenge (CTC) files, the tracks table and the lineage summary.

A CTC result folder holds one uint16 mask per frame, `mask000.tif`, `mask001.tif`, ... (four
digits when the movie has more than 1000 frames), whose pixels carry track ids, and
`res_track.txt` with one `L B E P` line per track: label, first frame, last frame, parent label
(0 = none). Ground truth in the CTC layout has `TRA/man_track000.tif`... and
`TRA/man_track.txt`; `read_ctc` accepts both.

`tracks.csv` (and `tracks.parquet` when pyarrow is installed) has one row per track per frame,
columns `track_id, t, y, x, area, parent_track_id` (parent 0 = none): napari's Tracks layer
takes `[track_id, t, y, x]` as data and `{track_id: [parent]}` as its graph.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tifffile

from . import ImageReadError, atomic_write  # the package's stable names

TRACKS_COLUMNS = ("track_id", "t", "y", "x", "area", "parent_track_id")
_MASK_RE = re.compile(r"^(mask|man_track)(\d+)\.tiff?$", re.IGNORECASE)


def mask_name(t: int, n_frames: int) -> str:
    """`mask007.tif` (3 digits), or 4 digits for movies longer than 1000 frames."""
    return f"mask{t:0{4 if n_frames > 1000 else 3}d}.tif"


def track_table(labels: np.ndarray, parents: Mapping[int, int]) -> np.ndarray:
    """CTC rows `L B E P` from a label stack (first and last frame of each id) and parents."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for t, frame in enumerate(labels):
        for lab in np.unique(frame).tolist():
            if lab:
                first.setdefault(lab, t)
                last[lab] = t
    rows = [[lab, first[lab], last[lab], int(parents.get(lab, 0))] for lab in sorted(first)]
    return np.array(rows, np.int64).reshape(-1, 4)


def write_ctc(folder: "str | Path", labels: np.ndarray, tracks: np.ndarray) -> Path:
    """Write the masks and `res_track.txt` into `folder` (which must exist), atomically per file."""
    folder = Path(folder)
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a (T, Y, X) label stack, got shape {labels.shape}")
    top = int(labels.max()) if labels.size else 0
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"track id {top} does not fit the CTC format's uint16 masks")
    n = labels.shape[0]
    for t in range(n):
        frame = labels[t].astype(np.uint16)
        atomic_write(folder / mask_name(t, n),
                     lambda fh, f=frame: tifffile.imwrite(fh, f, compression="zlib",
                                                          photometric="minisblack", metadata=None))
    text = "".join(f"{l} {b} {e} {p}\n" for l, b, e, p in np.asarray(tracks, np.int64))
    atomic_write(folder / "res_track.txt", lambda fh: fh.write(text.encode("ascii")))
    # Masks of an earlier, longer movie in the same folder would corrupt this result.
    written = {mask_name(t, n) for t in range(n)}
    for old in _frame_files(folder):
        if old.name not in written and old.name.lower().startswith("mask"):
            old.unlink()
    return folder


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and _MASK_RE.match(p.name)]
    return sorted(files, key=lambda p: int(_MASK_RE.match(p.name).group(2)))


def ctc_layout(folder: "str | Path") -> tuple[list[Path], Path]:
    """The frame files and the track file of a CTC folder (flat result, or GT with TRA/)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(folder, "no such folder" if not folder.exists() else "not a folder")
    for where, txt in ((folder, "res_track.txt"), (folder / "TRA", "man_track.txt"),
                       (folder, "man_track.txt")):
        if (where / txt).is_file():
            files = _frame_files(where)
            if not files:
                raise ImageReadError(where, f"has {txt} but no mask*.tif / man_track*.tif frames")
            return files, where / txt
    raise ImageReadError(folder, "not a CTC folder (expected res_track.txt with mask*.tif, or "
                                 "TRA/man_track.txt with TRA/man_track*.tif)")


def read_track_file(path: "str | Path") -> np.ndarray:
    """`L B E P` rows of a res_track.txt / man_track.txt as an (N, 4) int64 array."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            values = [int(v) for v in parts]
        except ValueError:
            values = []
        if len(values) != 4:
            raise ImageReadError(path, f"line {n}: expected 'L B E P' (four integers), "
                                       f"got {line.strip()!r}")
        rows.append(values)
    return np.array(rows, np.int64).reshape(-1, 4)


def read_ctc(folder: "str | Path") -> tuple[np.ndarray, np.ndarray]:
    """Read a CTC folder: the (T, Y, X) label stack and its (N, 4) `L B E P` table."""
    files, txt = ctc_layout(folder)
    frames = [tifffile.imread(f) for f in files]
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ImageReadError(folder, f"frames differ in shape: {sorted(shapes)}")
    return np.stack(frames), read_track_file(txt)


# -- tracks table and lineage ---------------------------------------------------------------------

def tracks_rows(labels: np.ndarray, parents: Mapping[int, int]) -> dict[str, np.ndarray]:
    """The tracks table as columns: one row per track per frame, centroid (px) and area."""
    cols: dict[str, list[np.ndarray]] = {c: [] for c in TRACKS_COLUMNS}
    for t, frame in enumerate(labels):
        flat = frame.ravel().astype(np.int64)
        ids = np.unique(flat)
        ids = ids[ids > 0]
        if not ids.size:
            continue
        # Compact ids -> dense bins, so huge track ids do not make huge bincounts.
        idx = np.searchsorted(ids, flat)
        fg = flat > 0
        yy, xx = np.divmod(np.flatnonzero(fg), frame.shape[1])
        area = np.bincount(idx[fg], minlength=ids.size)
        cols["track_id"].append(ids)
        cols["t"].append(np.full(ids.size, t, np.int64))
        cols["y"].append(np.bincount(idx[fg], weights=yy, minlength=ids.size) / area)
        cols["x"].append(np.bincount(idx[fg], weights=xx, minlength=ids.size) / area)
        cols["area"].append(area.astype(np.int64))
        cols["parent_track_id"].append(np.array([parents.get(int(i), 0) for i in ids], np.int64))
    return {c: (np.concatenate(v) if v else np.zeros(0, np.float64 if c in "yx" else np.int64))
            for c, v in cols.items()}


def write_tracks_table(folder: "str | Path", columns: Mapping[str, np.ndarray]) -> list[Path]:
    """`tracks.csv` and, when pyarrow is installed, `tracks.parquet`; returns the paths."""
    import pandas as pd

    folder = Path(folder)
    df = pd.DataFrame({c: columns[c] for c in TRACKS_COLUMNS})
    df = df.sort_values(["track_id", "t"], kind="stable").reset_index(drop=True)
    data = df.to_csv(index=False, float_format="%.2f", lineterminator="\n").encode("utf-8")
    written = [atomic_write(folder / "tracks.csv", lambda fh: fh.write(data))]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return written
    written.append(atomic_write(folder / "tracks.parquet", lambda fh: df.to_parquet(fh,
                                                                                     index=False)))
    return written


def read_tracks_table(path: "str | Path"):
    """A tracks table (CSV or Parquet) as a pandas DataFrame with the expected columns."""
    import pandas as pd

    path = Path(path)
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = [c for c in TRACKS_COLUMNS if c not in df.columns]
    if missing:
        raise ImageReadError(path, f"tracks table lacks columns {', '.join(missing)}")
    return df


def write_json(path: "str | Path", payload: Mapping[str, Any]) -> Path:
    data = (json.dumps(payload, indent=2) + "\n").encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))
