"""Reading microscopy images (TIFF/OME-TIFF, PNG/JPEG, NPY) and writing results atomically."""
from __future__ import annotations

import csv
import glob
import io as _io
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence

import cv2
import numpy as np
import tifffile

TIFF_EXTENSIONS = (".tif", ".tiff")
CV2_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
IMAGE_EXTENSIONS = TIFF_EXTENSIONS + CV2_EXTENSIONS + (".npy",)
CHANNEL_AXES = "CS"  # tifffile: C = channel, S = sample (e.g. RGB)
SPATIAL_AXES = "YX"
GENERIC_AXES = "IQ"  # tifffile's names for page sequences / dimensions of unknown meaning


class ImageReadError(Exception):
    """An input image that cannot be used; str() is the one line "<file>: <reason>"."""

    def __init__(self, path: "str | Path", reason: str):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the library said
        super().__init__(f"{path}: {self.reason}")


class OutputDirError(Exception):
    """An output folder that cannot be created or written to."""


# -- inputs ----------------------------------------------------------------------------------

def is_image_file(path: Path) -> bool:
    """True for a file whose extension is one we read."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def expand_inputs(specs: Iterable[str]) -> list[Path]:
    """Turn files, folders (their images, not recursive) and globs into a list of image paths.

    A path that does not exist, a glob that matches no image and a folder without images are
    kept in the list as given, so that reading them reports the problem for that input alone.
    """
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve() if p.exists() else p
        if key not in seen:
            seen.add(key)
            out.append(p)

    for spec in specs:
        spec = os.path.expanduser(str(spec))
        path = Path(spec)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
            for p in images or [path]:
                add(p)
        elif not path.exists() and any(c in spec for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(spec))]
            images = []
            for m in matches:
                if m.is_dir():
                    images += sorted(p for p in m.iterdir() if p.is_file() and is_image_file(p))
                elif is_image_file(m):
                    images.append(m)
            for p in images or [path]:
                add(p)
        else:
            add(path)
    return out


def output_stem(path: "str | Path") -> str:
    """Base name for a result file: "a/img.ome.tif" -> "img"."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_image(path: "str | Path", axes: str | None = None,
               planes: Mapping[str, int] | None = None) -> np.ndarray:
    """Read one image as a YX or YXC array (or a 3-D stack whose channel axis is unknown).

    `axes` names the stored dimensions (e.g. "CYX", "YXC", "ZCYX"); axes other than Y, X and
    C/S must have one plane or be picked with `planes` (e.g. {"Z": 3}). Raises ImageReadError.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file")
    if path.is_dir():
        if any(p.is_file() and is_image_file(p) for p in path.iterdir()):
            raise ImageReadError(path, "is a folder; pass it as an input to read its images")
        raise ImageReadError(path, "folder contains no image files "
                                   f"({', '.join(IMAGE_EXTENSIONS)})")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise ImageReadError(path, f"unsupported file type {path.suffix or '(no extension)'!r} "
                                   f"(expected {', '.join(IMAGE_EXTENSIONS)})")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageReadError(path, f"cannot read: {exc.strerror or exc}") from exc
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")

    planes = {k.upper(): int(v) for k, v in (planes or {}).items()}
    if suffix in TIFF_EXTENSIONS:
        arr, known_axes, full = _read_tiff(path)
    elif suffix == ".npy":
        arr, known_axes, full = _read_npy(path), None, None
    else:
        arr, known_axes, full = _read_cv2(path), None, None
    _check_values(arr, path)
    if axes:
        arr = _apply_axes(arr, axes.upper(), planes, path, full)
    elif known_axes is not None and not all(a in GENERIC_AXES + SPATIAL_AXES for a in known_axes):
        arr = _apply_axes(arr, known_axes, planes, path, None)
    elif planes:
        raise ImageReadError(path, "--plane needs named axes; give them with --axes")
    elif arr.ndim > 3:
        raise ImageReadError(path, f"{arr.ndim}-D image of shape {arr.shape} with axes of unknown "
                                   "meaning; say which is which with --axes (e.g. ZCYX)")
    if arr.ndim < 2:
        raise ImageReadError(path, f"{arr.ndim}-D array of shape {arr.shape}; expected an image")
    return arr


def _read_tiff(path: Path) -> tuple[np.ndarray, str, tuple[np.ndarray, str]]:
    """Pixels of the first series, its (squeezed) axes, and the unsqueezed view of both."""
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ImageReadError(path, "corrupt or unreadable TIFF: no image data in it")
            series = tif.series[0]
            arr = series.asarray()
            axes = series.axes
            full = (arr.reshape(series.get_shape(False)), series.get_axes(False))
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise ImageReadError(path, f"corrupt or unreadable TIFF: {exc or type(exc).__name__}") from exc
    return arr, axes, full


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ImageReadError(path, "holds Python objects (pickled); only plain numeric "
                                       "arrays are read") from exc
        raise ImageReadError(path, f"corrupt or unreadable .npy file: {exc}") from exc
    except Exception as exc:  # EOFError, OSError, ... for damaged files
        raise ImageReadError(path, f"corrupt or unreadable .npy file: {exc or type(exc).__name__}") from exc
    if not isinstance(arr, np.ndarray):
        raise ImageReadError(path, "not a single numpy array (.npz archives are not read)")
    return arr


def _read_cv2(path: Path) -> np.ndarray:
    # imdecode from bytes: cv2.imread cannot open non-ASCII paths on Windows.
    data = np.fromfile(path, dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(path, f"corrupt or unreadable {path.suffix.lstrip('.').upper()} file")
    if arr.ndim == 3 and arr.shape[2] == 4:
        # Alpha is transparency, not a measured channel.
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    elif arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    return arr


def _check_values(arr: np.ndarray, path: Path) -> None:
    """Reject arrays that cannot be intensities."""
    if arr.size == 0:
        raise ImageReadError(path, f"zero-size array (shape {arr.shape})")
    if arr.dtype == bool:
        raise ImageReadError(path, "boolean array; expected intensities, not a mask")
    if np.iscomplexobj(arr):
        raise ImageReadError(path, f"complex-valued array ({arr.dtype}); expected real intensities")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageReadError(path, f"unsupported data type {arr.dtype}; expected numbers")
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise ImageReadError(path, f"contains NaN or Inf values ({bad} pixels)")


def _drop_unnamed_singletons(full: tuple[np.ndarray, str], axes: str) -> np.ndarray:
    """The unsqueezed array without its length-1 axes whose letters `axes` does not use."""
    arr, stored = full
    drop = tuple(i for i, (a, n) in enumerate(zip(stored, arr.shape)) if n == 1 and a not in axes)
    return arr.squeeze(axis=drop) if drop else arr


def _apply_axes(arr: np.ndarray, axes: str, planes: Mapping[str, int], path: Path,
                full: tuple[np.ndarray, str] | None) -> np.ndarray:
    """Reduce an array with named axes to YX or YXC, picking single planes of other axes."""
    if len(set(axes)) != len(axes) or not axes.isalpha():
        raise ImageReadError(path, f"axes {axes!r} must be distinct letters such as CYX or ZCYX")
    if "Y" not in axes or "X" not in axes:
        raise ImageReadError(path, f"axes {axes!r} must include Y and X")
    if len(axes) != arr.ndim:
        # tifffile drops length-1 axes; the user may have described the unsqueezed layout.
        trimmed = _drop_unnamed_singletons(full, axes) if full is not None else None
        if trimmed is not None and len(axes) == trimmed.ndim:
            arr = trimmed
        else:
            extra = f", stored axes {full[1]}" if full is not None else ""
            raise ImageReadError(path, f"axes {axes!r} name {len(axes)} dimensions but the image "
                                       f"has {arr.ndim} (shape {arr.shape}{extra})")
    index: list[Any] = []
    kept = ""
    for letter, size in zip(axes, arr.shape):
        if letter in SPATIAL_AXES or letter in CHANNEL_AXES:
            index.append(slice(None))
            kept += letter
        elif letter in planes:
            i = planes[letter]
            if not -size <= i < size:
                raise ImageReadError(path, f"plane {letter}={i} out of range (axis {letter} has "
                                           f"{size} planes)")
            index.append(i)
        elif size == 1:
            index.append(0)
        else:
            raise ImageReadError(path, f"axis {letter} has {size} planes (axes {axes}, shape "
                                       f"{arr.shape}); pick one with --plane {letter}=INDEX")
    unknown = set(planes) - set(axes)
    if unknown:
        raise ImageReadError(path, f"--plane names axes {''.join(sorted(unknown))} that are not "
                                   f"in {axes!r}")
    arr = arr[tuple(index)]
    channels = [a for a in kept if a in CHANNEL_AXES]
    # Several channel-like axes: keep the ones with >1 entries; two such is ambiguous.
    for letter in list(channels):
        if len(channels) > 1 and arr.shape[kept.index(letter)] == 1:
            arr = np.take(arr, 0, axis=kept.index(letter))
            kept = kept.replace(letter, "")
            channels.remove(letter)
    if len(channels) > 1:
        raise ImageReadError(path, f"axes {axes!r} hold two channel axes ({'/'.join(channels)}) "
                                   "with several entries each")
    order = [kept.index("Y"), kept.index("X")] + [kept.index(c) for c in channels]
    arr = np.transpose(arr, order)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


# -- outputs ---------------------------------------------------------------------------------

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        # Reopened by name: tifffile needs a file object whose .name is a path.
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


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


def label_dtype(labels: np.ndarray) -> np.dtype:
    """uint16 when the labels fit (most images), else uint32."""
    top = int(labels.max()) if labels.size else 0
    if top <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if top <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise ValueError(f"label {top} does not fit in uint32")


def write_labels_tiff(path: "str | Path", labels: np.ndarray) -> Path:
    """Write a 2-D label image as a compressed uint16/uint32 TIFF, atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label image must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label image must be integers, got {labels.dtype}")
    if labels.size and int(labels.min()) < 0:
        raise ValueError("label image has negative labels")
    out = labels.astype(label_dtype(labels), copy=False)
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
