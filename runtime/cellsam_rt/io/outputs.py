"""Writing a run's results: label TIFFs, cell tables, overlays; every file atomically (a temp
file in the same folder, fsync, rename), so a killed run never leaves a half-written result."""
from __future__ import annotations

import csv
import io as _io
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import cv2
import numpy as np
import tifffile

from cellsam_rt.errors import OutputDirError


def label_dtype(n: int) -> np.dtype:
    """Smallest unsigned dtype our label images use for n labels: uint16, or uint32 past 65535."""
    if n < 0:
        raise ValueError(f"label count must be >= 0, got {n}")
    if n <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if n <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise ValueError(f"{n} labels do not fit a uint32 label image")


def prepare_output_dir(path: "str | Path") -> Path:
    """Create the output folder if needed and prove it is writable; OutputDirError otherwise."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output folder {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # os.access is unreliable (root, ACLs, read-only mounts); try a real write.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OutputDirError(f"output folder {path}: cannot write there "
                             f"({exc.strerror or exc})") from exc
    return path


def _file_mode() -> int:
    """Permissions a plain open() would give a new file (mkstemp's 0600 is too strict)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: "str | Path", write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through `write(fileobj)` so that readers see the old file or the whole new one."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as exc:
        raise _naming(exc, path) from exc
    os.close(fd)
    try:
        # Reopened by name: tifffile needs a file object whose .name is a path.
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _naming(exc, path) from exc
        raise
    _fsync_dir(path.parent)
    return path


def _naming(exc: OSError, path: Path) -> OSError:
    """The error with the file the caller asked for, not the temporary file, as its filename."""
    if exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))  # keeps the subclass


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); not possible on Windows, where it is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_labels(labels, ndim: int, what: str = "labels") -> np.ndarray:
    """`labels` as an array of non-negative integers with `ndim` dimensions, else ValueError."""
    labels = np.asarray(labels)
    if labels.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got {labels.dtype}")
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"{what} must not be negative")
    return labels


def write_labels_tiff(path: "str | Path", labels: np.ndarray) -> Path:
    """Write a 2-D label image as a compressed uint16/uint32 TIFF, atomically."""
    labels = check_labels(labels, 2, "label image")
    out = labels.astype(label_dtype(int(labels.max()) if labels.size else 0), copy=False)
    return atomic_write(path, lambda fh: tifffile.imwrite(
        fh, out, compression="zlib", photometric="minisblack", metadata=None))


def write_table_csv(path: "str | Path", rows: "Sequence[Mapping[str, Any]] | np.ndarray",
                    columns: Sequence[str] | None = None) -> Path:
    """Write a table (a structured array, or one mapping per row) as CSV with a header, atomically."""
    text = _io.StringIO(newline="")
    if isinstance(rows, np.ndarray) and rows.dtype.names:
        # A structured array names its columns even when it has no rows.
        columns = list(columns or rows.dtype.names)
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(_csv_value(row[c]) for c in columns)
    else:
        if columns is None:
            columns = list(rows[0].keys()) if len(rows) else []
        writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n",
                                extrasaction="raise")
        if columns:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    data = text.getvalue().encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))


def _csv_value(value: Any) -> Any:
    """Plain Python numbers (numpy scalars print as np.float32(...) in some versions)."""
    return value.item() if isinstance(value, np.generic) else value


def write_png(path: "str | Path", rgb: np.ndarray) -> Path:
    """Write an RGB (or grey) uint8/uint16 image as PNG, atomically."""
    rgb = np.asarray(rgb)
    if rgb.dtype not in (np.uint8, np.uint16) or rgb.ndim not in (2, 3) or (
            rgb.ndim == 3 and rgb.shape[2] not in (1, 3)):
        raise ValueError(f"PNG needs HxW or HxWx3 uint8/uint16, got {rgb.shape} {rgb.dtype}")
    bgr = rgb[..., ::-1] if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError(f"{path}: PNG encoding failed")
    data = buf.tobytes()
    return atomic_write(path, lambda fh: fh.write(data))


def _to_display(channel: np.ndarray) -> np.ndarray:
    """Stretch one channel to uint8 between its 0.5th and 99.5th percentiles."""
    channel = channel.astype(np.float32, copy=False)
    lo, hi = np.percentile(channel, (0.5, 99.5))
    if hi <= lo:
        return np.zeros(channel.shape, np.uint8)
    return (np.clip((channel - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def outline_mask(labels: np.ndarray) -> np.ndarray:
    """Pixels of a cell whose 4-neighbour has another label (cell borders, inside the cell)."""
    edge = np.zeros(labels.shape, bool)
    diff_y = labels[1:, :] != labels[:-1, :]
    diff_x = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    return edge & (labels > 0)


def overlay_outlines(image: np.ndarray, labels: np.ndarray,
                     color: tuple[int, int, int] = (255, 255, 0)) -> np.ndarray:
    """RGB uint8 view of the image with cell outlines drawn on it, for a quick visual check.

    Channels: 1 -> grey; 2 -> (nuclear, whole-cell) as blue and green; 3 -> RGB; more -> first 3.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in size")
    chans = [_to_display(image[..., i]) for i in range(min(image.shape[2], 3))]
    if len(chans) == 1:
        rgb = np.repeat(chans[0][..., None], 3, axis=2)
    elif len(chans) == 2:
        rgb = np.stack([np.zeros_like(chans[0]), chans[1], chans[0]], axis=2)
    else:
        rgb = np.stack(chans, axis=2)
    rgb[outline_mask(labels)] = color
    return rgb
