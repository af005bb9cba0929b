"""Reading microscopy images: TIFF/OME-TIFF (axes from metadata), PNG/JPEG, NPY; planes and channels."""
from __future__ import annotations

import glob
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import cv2
import numpy as np
import tifffile

from cellsam_rt.errors import ImageReadError, OutputDirError  # noqa: F401  (re-exported)

TIFF_EXTENSIONS = (".tif", ".tiff")
CV2_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
IMAGE_EXTENSIONS = TIFF_EXTENSIONS + CV2_EXTENSIONS + (".npy",)
CHANNEL_AXES = "CS"  # tifffile: C = channel, S = sample (e.g. RGB)
SPATIAL_AXES = "YX"
GENERIC_AXES = "IQ"  # tifffile's names for page sequences / dimensions of unknown meaning
# Largest plane (Y x X) read: OpenCV indexes pixels with 32-bit ints, and the pipeline keeps
# float copies of the whole plane. Checked from the file's header, before any pixel is read.
MAX_PLANE_PIXELS = 2**31
_TOO_BIG_HINT = ("crop or bin it first, or convert it to a multiscale OME-Zarr and segment a "
                 "lower-resolution level")
# Leading bytes of the formats we read, to name what a mislabelled file really is.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"),
          (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
          (b"\x93NUMPY", "NPY"), (b"BM", "BMP"))


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
    _check_format(path, suffix)

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


def _sniff(path: Path) -> str | None:
    """The format a file's leading bytes say it is (None: not one we know)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read: {exc.strerror or exc}") from exc
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _check_format(path: Path, suffix: str) -> None:
    """Refuse a file whose content is another image format than its extension says."""
    found = _sniff(path)
    expected = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".jpg": "JPEG",
                ".jpeg": "JPEG", ".bmp": "BMP", ".npy": "NPY"}[suffix]
    if found is not None and found != expected:
        raise ImageReadError(path, f"is a {found} file named {path.suffix}; rename it to "
                                   f"{'.tif' if found == 'TIFF' else '.' + found.lower()}")


def _check_size(path: Path, shape: tuple, dtype: np.dtype, axes: str | None = None) -> None:
    """Refuse, before reading, an image too large to segment or to hold in memory."""
    shape = tuple(int(n) for n in shape)
    if axes and "Y" in axes and "X" in axes and len(axes) == len(shape):
        h, w = shape[axes.index("Y")], shape[axes.index("X")]
    else:  # no named axes: the two largest dimensions are the plane
        h, w = (sorted(shape)[-2:] if len(shape) >= 2 else (1, shape[0] if shape else 1))
    if h * w > MAX_PLANE_PIXELS:
        raise ImageReadError(path, f"image plane of {h} x {w} pixels is too large (at most "
                                   f"2**31 = {MAX_PLANE_PIXELS} pixels per plane); "
                                   + _TOO_BIG_HINT)
    need = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    memory = physical_memory()
    if memory is not None and need > memory:
        raise ImageReadError(path, f"reading it needs {need / 2**30:.1f} GiB ({shape} "
                                   f"{np.dtype(dtype)}), more than this machine's memory "
                                   f"({memory / 2**30:.1f} GiB); " + _TOO_BIG_HINT)


def physical_memory() -> int | None:
    """Bytes of RAM on this machine (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _read_tiff(path: Path) -> tuple[np.ndarray, str, tuple[np.ndarray, str]]:
    """Pixels of the first series, its (squeezed) axes, and the unsqueezed view of both."""
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ImageReadError(path, "corrupt or unreadable TIFF: no image data in it")
            series = tif.series[0]
            _check_size(path, series.shape, series.dtype, series.axes)
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
        header = _npy_header(path)
        if header is not None:  # checked before the pixels are read
            _check_size(path, *header)
        arr = np.load(path, allow_pickle=False)
    except ImageReadError:
        raise
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


def _npy_header(path: Path) -> tuple[tuple, np.dtype] | None:
    """(shape, dtype) from a .npy header; None when it is not a plain .npy (np.load says why)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(fh)
    except (ValueError, OSError, EOFError, SyntaxError):
        return None
    return shape, dtype


def _walk_png(path: Path, data: np.ndarray) -> tuple[int, int] | None:
    """(height, width) of a PNG, after checking its chunks' lengths and checksums.

    A file cut short or damaged is reported here, in one line, instead of by libpng on stderr.
    Returns None for data that is not PNG.
    """
    buf = memoryview(data)
    if bytes(buf[:8]) != _MAGIC[0][0]:
        return None
    bad = "corrupt or unreadable PNG file: "
    pos, size, shape = 8, len(buf), None
    while True:
        if pos + 12 > size:
            raise ImageReadError(path, bad + "truncated (it ends before its last chunk)")
        length, kind = struct.unpack(">I4s", buf[pos:pos + 8])
        name = kind.decode("latin-1")
        end = pos + 12 + length
        if end > size:
            raise ImageReadError(path, bad + f"truncated (it ends inside its {name} chunk)")
        if zlib.crc32(buf[pos + 4:end - 4]) != struct.unpack(">I", buf[end - 4:end])[0]:
            raise ImageReadError(path, bad + f"wrong checksum in its {name} chunk")
        if shape is None:
            if kind != b"IHDR" or length < 8:
                raise ImageReadError(path, bad + "it does not start with an IHDR chunk")
            width, height = struct.unpack(">II", buf[pos + 8:pos + 16])
            shape = (height, width)
        if kind == b"IEND":
            return shape
        pos = end


def _read_cv2(path: Path) -> np.ndarray:
    # imdecode from bytes: cv2.imread cannot open non-ASCII paths on Windows.
    data = np.fromfile(path, dtype=np.uint8)
    size = _walk_png(path, data)
    if size is not None:
        _check_size(path, size, np.uint16)
    try:
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        kind = path.suffix.lstrip(".").upper()
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
            raise ImageReadError(path, f"OpenCV cannot decode this {kind} file: more pixels than "
                                       "its limit (CV_IO_MAX_IMAGE_PIXELS, 2**30 by default); "
                                       "save the image as TIFF") from exc
        raise ImageReadError(path, f"OpenCV cannot decode this {kind} file: "
                                   f"{str(exc).strip() or type(exc).__name__}") from exc
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
            raise ImageReadError(path, f"contains NaN or Inf values ({bad} pixels); replace "
                                       "them with numbers (e.g. numpy.nan_to_num) first")


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


