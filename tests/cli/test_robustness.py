"""`cellsam-rt run` on bad input, as a user meets it: a real `cellsam-rt` process, the shipped
default model, real files. Each bad input gives one line `error: <file>: <problem>` on stderr and
no outputs of its own, the other inputs still finish, and the exit status says what happened
(1: some inputs failed, 2: the run could not start, 130: interrupted).

One test per row of docs/robustness.md. Most rows share one run over a folder holding every
case (`batch`), which is what a user with a messy folder gets, and keeps the model loaded once.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cellsam_rt.io.images import MAX_PLANE_PIXELS, physical_memory

CLI = [sys.executable, "-m", "cellsam_rt.cli", "run"]
DEFAULT_MODEL = Path(__import__("cellsam_rt").__file__).parent / "models" / "default"


# -- inputs ------------------------------------------------------------------------------------

def blobs(seed: int = 0, h: int = 128, w: int = 128) -> np.ndarray:
    """Bright round nuclei on a dim background (uint16), which the default model segments."""
    rng = np.random.default_rng(seed)
    img = rng.normal(50, 5, (h, w))
    yy, xx = np.mgrid[:h, :w]
    for _ in range(8):
        cy, cx = rng.uniform(12, h - 12), rng.uniform(12, w - 12)
        img += 2000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40)
    return np.clip(img, 0, 65535).astype(np.uint16)


def png_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def flipped(data: bytes, at: int) -> bytes:
    """`data` with the bits of one byte inverted (a damaged copy)."""
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def npy_header_only(path: Path, shape: tuple, dtype) -> None:
    """A .npy whose header claims `shape` but holds no pixels: the reader must judge the size
    from the header alone (reading would fail, allocating would need terabytes)."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                 "fortran_order": False, "shape": tuple(shape)})


def bigtiff_header_only(path: Path, h: int, w: int) -> None:
    """A BigTIFF with one uint16 h x w strip that is not in the file (only its header is)."""
    tags = [(256, 16, w), (257, 16, h), (258, 3, 16), (259, 3, 1), (262, 3, 1),
            (273, 16, 4096), (277, 3, 1), (278, 16, h), (279, 16, h * w * 2)]
    ifd = struct.pack("<Q", len(tags))
    for tag, typ, value in tags:
        ifd += struct.pack("<HHQ", tag, typ, 1)
        ifd += struct.pack("<H6x", value) if typ == 3 else struct.pack("<Q", value)
    ifd += struct.pack("<Q", 0)
    path.write_bytes(b"II" + struct.pack("<HHHQ", 43, 8, 0, 16) + ifd)


def png_header_only(path: Path, h: int, w: int) -> None:
    """A PNG whose IHDR claims h x w 16-bit grey pixels, followed by a token of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


GOOD = blobs(0)
FLOAT_BAD = GOOD.astype(np.float32)


def _with(value, dtype=np.float32) -> np.ndarray:
    img = GOOD.astype(dtype)
    img[5, 7] = value
    return img


# name -> writer. Files that must be refused are listed in REFUSED with the words their one
# error line must hold; files that must be segmented in SEGMENTED.
def _write_inputs(folder: Path) -> None:
    good_tif = folder / "good.tif"
    tifffile.imwrite(good_tif, GOOD)
    full = good_tif.read_bytes()
    jpeg_bytes = cv2.imencode(".jpg", (GOOD >> 4).astype(np.uint8))[1].tobytes()
    writers = {
        "empty_tif.tif": lambda p: p.write_bytes(b""),
        "empty_png.png": lambda p: p.write_bytes(b""),
        "empty_npy.npy": lambda p: p.write_bytes(b""),
        "truncated.tif": lambda p: p.write_bytes(full[: len(full) // 2]),
        "truncated_png.png": lambda p: p.write_bytes(png_bytes(GOOD)[:-200]),
        "truncated_jpg.jpg": lambda p: p.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2]),
        "bit_flip.png": lambda p: p.write_bytes(flipped(png_bytes(GOOD), 100)),
        "png_named.tif": lambda p: p.write_bytes(png_bytes((GOOD >> 4).astype(np.uint8))),
        "tiff_named.png": lambda p: p.write_bytes(full),
        "text_named.png": lambda p: p.write_text("plate 3, well B4: see the lab book\n"),
        "tiny_1x1.tif": lambda p: tifffile.imwrite(p, np.array([[700]], np.uint16)),
        "tiny_3x3.tif": lambda p: tifffile.imwrite(p, np.arange(9, dtype=np.uint16).reshape(3, 3)),
        "all_zero.tif": lambda p: tifffile.imwrite(p, np.zeros((96, 96), np.uint16)),
        "with_nan.npy": lambda p: np.save(p, _with(np.nan)),
        "with_inf.tif": lambda p: tifffile.imwrite(p, _with(np.inf)),
        "stack_5.npy": lambda p: np.save(p, np.stack([blobs(s) for s in range(5)])),
        # an 8-bit RGB export of a nuclear stain: nuclei in blue (cv2 writes BGR), red and
        # green empty
        "rgb.png": lambda p: p.write_bytes(png_bytes(np.stack(
            [(blobs(0) >> 4).astype(np.uint8)] + [np.zeros((128, 128), np.uint8)] * 2,
            axis=-1))),
        "four_channels.npy": lambda p: np.save(p, np.stack([blobs(s) for s in range(4)], -1)),
        "float64.npy": lambda p: np.save(p, GOOD.astype(np.float64)),
        "int64.npy": lambda p: np.save(p, GOOD.astype(np.int64)),
        "uint32.npy": lambda p: np.save(p, GOOD.astype(np.uint32)),
        "big_endian.npy": lambda p: np.save(p, GOOD.astype(">u2")),
        "big_endian_tiff.tif": lambda p: tifffile.imwrite(p, GOOD.astype(">u2")),
        "negative.npy": lambda p: np.save(p, GOOD.astype(np.int32) - 1000),
        "mask.npy": lambda p: np.save(p, GOOD > 500),
        "huge_plane.npy": lambda p: npy_header_only(p, (200_000, 200_000), np.uint16),
        "huge_plane.tif": lambda p: bigtiff_header_only(p, 100_000, 100_000),
        "huge_plane.png": lambda p: png_header_only(p, 100_000, 100_000),
        # Within our limits, above OpenCV's decoding limit (2**30 pixels).
        "opencv_limit.png": lambda p: png_header_only(p, 40_000, 40_000),
        # Planes within the limit, but the stack needs terabytes.
        "huge_stack.npy": lambda p: npy_header_only(p, (4096, 40_000, 40_000), np.uint16),
    }
    for name, write in writers.items():
        write(folder / name)


REFUSED = {
    "empty_tif.tif": "empty file (0 bytes)",
    "empty_png.png": "empty file (0 bytes)",
    "empty_npy.npy": "empty file (0 bytes)",
    "truncated.tif": "corrupt or unreadable TIFF",
    "truncated_png.png": "corrupt or unreadable PNG file: truncated",
    "truncated_jpg.jpg": "corrupt or unreadable JPG",
    "bit_flip.png": "wrong checksum in its IDAT chunk",
    "png_named.tif": "is a PNG file named .tif; rename it to .png",
    "tiff_named.png": "is a TIFF file named .png; rename it to .tif",
    "text_named.png": "corrupt or unreadable PNG",
    "with_nan.npy": "NaN or Inf values (1 pixels)",
    "with_inf.tif": "NaN or Inf values (1 pixels)",
    "stack_5.npy": "--axes",
    "four_channels.npy": "--channels",
    "mask.npy": "boolean",
    "huge_plane.npy": "200000 x 200000 pixels is too large",
    # larger than 4096^2: read region by region (blockwise), where its missing strip is found
    "huge_plane.tif": "cannot read pixels",
    "huge_plane.png": "100000 x 100000 pixels is too large",
    "opencv_limit.png": "OpenCV cannot decode this PNG file: more pixels than its limit",
    "huge_stack.npy": "more than this machine's memory",
    "missing.tif": "no such file",
}
SEGMENTED = ["good.tif", "tiny_1x1.tif", "tiny_3x3.tif", "all_zero.tif", "rgb.png", "float64.npy",
             "int64.npy", "uint32.npy", "big_endian.npy", "big_endian_tiff.tif", "negative.npy"]


# -- running it --------------------------------------------------------------------------------

def cellsam_rt(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`cellsam-rt run ARGS` in a real process; text stdout/stderr."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def the_error_for(stderr: str, path: Path) -> str:
    """The one stderr line about `path`; fails if there is none or several."""
    lines = [line for line in error_lines(stderr) if path.name in line]
    assert len(lines) == 1, f"expected one line about {path.name}, got {lines!r}\n{stderr}"
    line = lines[0]
    assert line.startswith(f"error: {path}: "), line
    assert line.count(path.name) == 1, f"the file is named more than once: {line}"
    return line


def outputs_of(out: Path, stem: str) -> list[str]:
    """Result files named after input `stem` (labels, table, overlay)."""
    return sorted(p.name for p in out.iterdir()
                  if p.name.startswith(stem + "_") or p.name.startswith(stem + "-")) \
        if out.is_dir() else []


def temp_files(out: Path) -> list[Path]:
    """atomic_write's temporaries (.NAME.XXXX.part) anywhere under the output folder."""
    return [p for p in out.rglob("*") if p.name.endswith(".part") or p.name.endswith(".tmp")]


def read_table(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def check_result(out: Path, stem: str, shape: tuple) -> np.ndarray:
    """The labels and table of one input are whole and agree with each other."""
    labels = tifffile.imread(out / f"{stem}_labels.tif")
    assert labels.shape == shape and labels.dtype in (np.uint16, np.uint32)
    table_path = out / f"{stem}_cells.csv"
    header = table_path.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[0] == "label" and "area" in header
    rows = read_table(table_path)
    ids = sorted(set(np.unique(labels).tolist()) - {0})
    assert sorted(int(r["label"]) for r in rows) == ids
    for r in rows:
        assert int(r["area"]) == int((labels == int(r["label"])).sum())
    return labels


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One `cellsam-rt run` over a folder holding every case, plus a file that does not exist."""
    root = tmp_path_factory.mktemp("robustness")
    folder = root / "inputs"
    folder.mkdir()
    _write_inputs(folder)
    out = root / "out"
    proc = cellsam_rt(folder, folder / "missing.tif", "--out", out, "--quiet")
    return folder, out, proc


def refused(batch, name: str) -> str:
    """Assert the batch refused input `name` with one line and wrote nothing for it."""
    folder, out, proc = batch
    line = the_error_for(proc.stderr, folder / name)
    assert REFUSED[name].lower() in line.lower(), line
    assert outputs_of(out, Path(name).stem) == []
    return line


def zero_cells(batch, name: str, shape: tuple) -> None:
    folder, out, proc = batch
    assert folder.joinpath(name).name not in proc.stderr
    labels = check_result(out, Path(name).stem, shape)
    assert not labels.any()
    table = (out / f"{Path(name).stem}_cells.csv").read_text().splitlines()
    assert len(table) == 1  # the header, no cells


# -- the shared run ----------------------------------------------------------------------------

def test_bad_inputs_do_not_stop_the_others(batch):
    folder, out, proc = batch
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert all(line.startswith("error: ") for line in lines), proc.stderr  # no tracebacks
    assert len(lines) == len(REFUSED), proc.stderr
    done = sorted(p.name[: -len("_labels.tif")] for p in out.glob("*_labels.tif"))
    assert done == sorted(Path(n).stem for n in SEGMENTED)
    assert temp_files(out) == []
    labels = check_result(out, "good", GOOD.shape)
    assert labels.max() >= 3  # the control image really has cells


@pytest.mark.parametrize("name", ["empty_tif.tif", "empty_png.png", "empty_npy.npy"])
def test_empty_file(batch, name):
    refused(batch, name)


@pytest.mark.parametrize("name", ["truncated.tif", "truncated_png.png", "truncated_jpg.jpg",
                                  "bit_flip.png"])
def test_truncated_or_damaged_file(batch, name):
    refused(batch, name)


@pytest.mark.parametrize("name", ["png_named.tif", "tiff_named.png", "text_named.png"])
def test_mislabelled_file(batch, name):
    refused(batch, name)


def test_missing_file(batch):
    refused(batch, "missing.tif")


@pytest.mark.parametrize("name, shape", [("tiny_1x1.tif", (1, 1)), ("tiny_3x3.tif", (3, 3))])
def test_tiny_image_has_no_cells(batch, name, shape):
    zero_cells(batch, name, shape)


def test_all_zero_image(batch):
    zero_cells(batch, "all_zero.tif", (96, 96))


@pytest.mark.parametrize("name", ["with_nan.npy", "with_inf.tif"])
def test_nan_and_inf_are_refused(batch, name):
    assert "nan_to_num" in refused(batch, name)


def test_stack_without_axes_is_refused(batch):
    line = refused(batch, "stack_5.npy")
    assert "5 channels" in line and "--plane" in line


def test_four_channels_need_channels(batch):
    refused(batch, "four_channels.npy")


def test_rgb_png(batch):
    _, out, _ = batch
    assert check_result(out, "rgb", GOOD.shape).max() >= 1


@pytest.mark.parametrize("name", ["float64.npy", "int64.npy", "uint32.npy", "big_endian.npy",
                                  "big_endian_tiff.tif"])
def test_other_dtypes_give_the_same_cells(batch, name):
    """The same intensities in another dtype or byte order segment exactly like the uint16 file."""
    _, out, _ = batch
    np.testing.assert_array_equal(check_result(out, Path(name).stem, GOOD.shape),
                                  check_result(out, "good", GOOD.shape))


def test_negative_values(batch):
    _, out, _ = batch
    assert check_result(out, "negative", GOOD.shape).max() >= 3


def test_boolean_mask_is_refused(batch):
    refused(batch, "mask.npy")


@pytest.mark.parametrize("name", ["huge_plane.npy", "huge_plane.png"])
def test_huge_plane_refused_from_the_header(batch, name):
    line = refused(batch, name)
    assert str(MAX_PLANE_PIXELS) in line and "OME-Zarr" in line


def test_huge_tiff_is_read_blockwise_and_its_missing_pixels_named(batch):
    assert "corrupted strip" in refused(batch, "huge_plane.tif")


def test_png_above_opencv_limit(batch):
    assert "save the image as TIFF" in refused(batch, "opencv_limit.png")


@pytest.mark.skipif(physical_memory() is None, reason="the OS does not report its memory")
def test_huge_stack_refused_before_reading(batch):
    assert "GiB" in refused(batch, "huge_stack.npy")


# -- runs of their own -------------------------------------------------------------------------

def test_four_channels_with_channels_option(tmp_path):
    np.save(tmp_path / "four.npy", np.stack([blobs(s) for s in range(4)], -1))
    proc = cellsam_rt(tmp_path / "four.npy", "--channels", "2,0", "--out", tmp_path / "out",
                      "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert check_result(tmp_path / "out", "four", GOOD.shape).max() >= 1


def test_stack_with_axes_and_plane(tmp_path, batch):
    np.save(tmp_path / "stack.npy", np.stack([np.zeros_like(GOOD), GOOD, np.zeros_like(GOOD)]))
    proc = cellsam_rt(tmp_path / "stack.npy", "--axes", "ZYX", "--plane", "Z=1",
                      "--out", tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    # Plane 1 is the good image: the same cells as the good image alone.
    np.testing.assert_array_equal(check_result(tmp_path / "out", "stack", GOOD.shape),
                                  check_result(batch[1], "good", GOOD.shape))


@pytest.fixture
def good_tif(tmp_path) -> Path:
    path = tmp_path / "good.tif"
    tifffile.imwrite(path, GOOD)
    return path


def assert_usage_error(proc, names: Path) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {names}"), proc.stderr
    return lines[0]


def assert_no_results(out: Path) -> None:
    if out.exists():
        assert list(out.glob("*_labels.tif")) == [] and list(out.glob("*.csv")) == []
        assert temp_files(out) == []


def test_missing_model_directory(tmp_path, good_tif):
    model = tmp_path / "no model here"
    proc = cellsam_rt(good_tif, "--model", model, "--out", tmp_path / "out")
    assert "does not exist" in assert_usage_error(proc, model)
    assert_no_results(tmp_path / "out")


def test_manifest_not_json(tmp_path, good_tif):
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model)
    (model / "manifest.json").write_text('{"format_version": 1, "name": ')
    proc = cellsam_rt(good_tif, "--model", model, "--out", tmp_path / "out")
    assert "invalid JSON" in assert_usage_error(proc, model / "manifest.json")
    assert_no_results(tmp_path / "out")


@pytest.fixture
def truncated_graph_model(tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model)
    graph = model / "encoder.onnx"
    graph.write_bytes(graph.read_bytes()[:100_000])
    return model


def test_truncated_graph(tmp_path, good_tif, truncated_graph_model):
    proc = cellsam_rt(good_tif, "--model", truncated_graph_model, "--out", tmp_path / "out")
    assert proc.returncode != 0
    graph = truncated_graph_model / "encoder.onnx"
    errors = [line for line in error_lines(proc.stderr) if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {graph}: "), proc.stderr
    assert "cannot load" in errors[0] and "Traceback" not in proc.stderr
    assert_no_results(tmp_path / "out")


def test_truncated_graph_is_one_error_for_many_inputs(tmp_path, good_tif, truncated_graph_model):
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, blobs(1))
    proc = cellsam_rt(good_tif, other, "--model", truncated_graph_model, "--out",
                      tmp_path / "out", "--quiet")
    assert_usage_error(proc, truncated_graph_model / "encoder.onnx")


def test_output_parent_is_a_file(tmp_path, good_tif):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    proc = cellsam_rt(good_tif, "--out", blocker / "out")
    assert "cannot write there" in assert_usage_error(proc, f"output folder {blocker / 'out'}")
    assert blocker.read_text() == "not a folder"


def test_output_is_a_file(tmp_path, good_tif):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    proc = cellsam_rt(good_tif, "--out", blocker)
    assert "not a folder" in assert_usage_error(proc, f"output folder {blocker}")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="root (and Windows) ignore a folder's write permission")
def test_output_folder_read_only(tmp_path, good_tif):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = cellsam_rt(good_tif, "--out", out)
        assert "cannot write there" in assert_usage_error(proc, f"output folder {out}")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_output_name_taken_by_a_folder(tmp_path, good_tif):
    """One input's result cannot be written: that input fails, naming the file; the rest finish."""
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, blobs(1))
    out = tmp_path / "out"
    (out / "good_labels.tif").mkdir(parents=True)
    proc = cellsam_rt(good_tif, other, "--out", out, "--quiet")
    assert proc.returncode == 1, proc.stderr
    line = the_error_for(proc.stderr, good_tif)
    assert str(out / "good_labels.tif") in line and ".part" not in line
    assert (out / "good_labels.tif").is_dir() and not (out / "good_cells.csv").exists()
    check_result(out, "other", GOOD.shape)
    assert temp_files(out) == []


def test_spaces_and_non_ascii_names(tmp_path):
    folder = tmp_path / "my images"
    folder.mkdir()
    tifffile.imwrite(folder / "zellkern ü 1.tif", GOOD)
    (folder / "Ωmega é.png").write_bytes(png_bytes((GOOD >> 4).astype(np.uint8)))
    out = tmp_path / "résultats 2"
    proc = cellsam_rt(folder, "--out", out, "--overlay")
    assert proc.returncode == 0, proc.stderr
    check_result(out, "zellkern ü 1", GOOD.shape)
    check_result(out, "Ωmega é", GOOD.shape)
    assert cv2.imdecode(np.fromfile(out / "Ωmega é_overlay.png", np.uint8),
                        cv2.IMREAD_COLOR).shape == GOOD.shape + (3,)
    assert "zellkern ü 1.tif" in proc.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_sigint_mid_folder(tmp_path):
    folder = tmp_path / "plate"
    folder.mkdir()
    for i in range(8):
        tifffile.imwrite(folder / f"img{i}.tif", blobs(i))
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, str(folder), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*_cells.csv")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no output appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    done = sorted(p.name[: -len("_labels.tif")] for p in out.glob("*_labels.tif"))
    assert 1 <= len(done) < 8
    assert sorted(p.name[: -len("_cells.csv")] for p in out.glob("*_cells.csv")) == done
    for stem in done:
        check_result(out, stem, GOOD.shape)
    assert temp_files(out) == []
