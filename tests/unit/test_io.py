"""Image reading (formats, axes, every rejection as one line naming the file) and atomic writers."""
from __future__ import annotations

import os
import sys

import cv2
import numpy as np
import pytest
import tifffile

from cellsam_rt import io
from cellsam_rt.io import ImageReadError, OutputDirError


def _one_line_error(path, **kw) -> str:
    with pytest.raises(ImageReadError) as info:
        io.read_image(path, **kw)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


# -- reading ---------------------------------------------------------------------------------

def test_png_is_read_as_rgb(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])  # cv2 writes BGR
    out = io.read_image(tmp_path / "a.png")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_png_alpha_is_dropped_and_16bit_grey_kept(tmp_path):
    bgra = np.full((8, 9, 4), 7, np.uint8)
    bgra[..., 3] = 255
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    assert io.read_image(tmp_path / "a.png").shape == (8, 9, 3)
    grey = (np.arange(72, dtype=np.uint16) * 900).reshape(8, 9)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    np.testing.assert_array_equal(io.read_image(tmp_path / "g.png"), grey)


def test_npy_and_jpeg(tmp_path):
    arr = np.random.default_rng(0).random((10, 12)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(io.read_image(tmp_path / "a.npy"), arr)
    cv2.imwrite(str(tmp_path / "b.jpg"), np.full((16, 16), 100, np.uint8))
    assert io.read_image(tmp_path / "b.jpg").shape == (16, 16)


def test_two_channel_tiff_and_rgb_tiff(tmp_path):
    img = np.random.default_rng(1).integers(0, 4000, (2, 40, 50)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "two.tif", img)
    # Stored as 2 pages of unknown meaning: left as is for the smallest-axis channel rule.
    np.testing.assert_array_equal(io.read_image(tmp_path / "two.tif"), img)
    out = io.read_image(tmp_path / "two.tif", axes="CYX")
    assert out.shape == (40, 50, 2)
    np.testing.assert_array_equal(out[..., 1], img[1])
    rgb = np.random.default_rng(1).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(io.read_image(tmp_path / "rgb.tif"), rgb)
    planar = np.ascontiguousarray(np.moveaxis(rgb, 2, 0))
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(io.read_image(tmp_path / "planar.tif"), rgb)  # SYX -> YXC


def test_multipage_tiff_without_metadata_and_with_axes(tmp_path):
    pages = np.random.default_rng(2).integers(0, 255, (3, 24, 32)).astype(np.uint8)
    with tifffile.TiffWriter(tmp_path / "mp.tif") as w:
        for page in pages:
            w.write(page, metadata=None)
    raw = io.read_image(tmp_path / "mp.tif")
    assert raw.shape == (3, 24, 32)  # unknown axes: left to the smallest-axis rule
    out = io.read_image(tmp_path / "mp.tif", axes="CYX")
    assert out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out[..., 2], pages[2])
    one = io.read_image(tmp_path / "mp.tif", axes="ZYX", planes={"Z": 1})
    np.testing.assert_array_equal(one, pages[1])


def test_ome_tiff_axes_and_plane_selection(tmp_path):
    stack = np.random.default_rng(3).integers(0, 1000, (4, 2, 20, 22)).astype(np.uint16)
    path = tmp_path / "s.ome.tif"
    tifffile.imwrite(path, stack, metadata={"axes": "ZCYX"})
    message = _one_line_error(path)
    assert "Z has 4 planes" in message and "--plane Z=" in message
    out = io.read_image(path, planes={"Z": 2})
    assert out.shape == (20, 22, 2)
    np.testing.assert_array_equal(out[..., 1], stack[2, 1])
    # The user may also spell out the axes, including tifffile's dropped length-1 axes.
    np.testing.assert_array_equal(io.read_image(path, axes="TZCYX", planes={"Z": 2}), out)
    assert "out of range" in _one_line_error(path, planes={"Z": 9})


def test_ome_single_plane_yx(tmp_path):
    img = np.arange(30 * 40, dtype=np.uint16).reshape(1, 1, 30, 40)
    tifffile.imwrite(tmp_path / "p.ome.tif", img, metadata={"axes": "CZYX"})
    np.testing.assert_array_equal(io.read_image(tmp_path / "p.ome.tif"), img[0, 0])


def test_unknown_4d_stack_asks_for_axes(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((2, 3, 16, 16), np.uint8))
    assert "--axes" in _one_line_error(tmp_path / "s.npy")
    out = io.read_image(tmp_path / "s.npy", axes="ZCYX", planes={"Z": 0})
    assert out.shape == (16, 16, 3)


def test_bad_axes_are_reported(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 16, 16), np.uint8))
    assert "2 dimensions" in _one_line_error(tmp_path / "a.npy", axes="YX")
    assert "must include Y and X" in _one_line_error(tmp_path / "a.npy", axes="CYZ")
    assert "distinct" in _one_line_error(tmp_path / "a.npy", axes="YYX")


@pytest.mark.parametrize("make, expect", [
    (lambda p: p.write_bytes(b"II*\x00" + b"\x00" * 40), "corrupt or unreadable TIFF"),
    (lambda p: p.write_bytes(b"this is not a tiff at all"), "corrupt or unreadable TIFF"),
    (lambda p: p.write_bytes(b""), "empty file"),
], ids=["truncated-tiff", "garbage-tiff", "empty"])
def test_bad_tiff_files(tmp_path, make, expect):
    path = tmp_path / "bad.tif"
    make(path)
    assert expect in _one_line_error(path)


@pytest.mark.parametrize("array, expect", [
    (np.zeros((0, 5), np.uint8), "zero-size"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or Inf"),
    (np.array([[1.0, np.inf], [0.0, 1.0]], np.float32), "NaN or Inf"),
    (np.ones((4, 4), bool), "boolean"),
    (np.ones((4, 4), np.complex64), "complex"),
    (np.zeros(7, np.uint8), "1-D array"),
], ids=["zero-size", "nan", "inf", "bool", "complex", "1d"])
def test_rejected_arrays(tmp_path, array, expect):
    path = tmp_path / "x.npy"
    np.save(path, array)
    assert expect in _one_line_error(path)


def test_rejected_tiff_values(tmp_path):
    bad = np.ones((8, 8), np.float32)
    bad[2, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", bad)
    assert "NaN or Inf values (1 pixels)" in _one_line_error(tmp_path / "nan.tif")


def test_pickled_npy_missing_and_unsupported(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "pickled" in _one_line_error(tmp_path / "obj.npy")
    assert "no such file" in _one_line_error(tmp_path / "nope.tif")
    (tmp_path / "notes.txt").write_text("hello")
    assert "unsupported file type '.txt'" in _one_line_error(tmp_path / "notes.txt")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert "corrupt or unreadable PNG" in _one_line_error(tmp_path / "broken.png")
    (tmp_path / "empty_dir").mkdir()
    assert "no image files" in _one_line_error(tmp_path / "empty_dir")


# -- expanding inputs ------------------------------------------------------------------------

def test_expand_inputs_files_folders_globs_and_missing(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.tif", "a.png", "c.npy"):
        (folder / name).write_bytes(b"x")
    (folder / "readme.txt").write_text("not an image")
    (folder / "sub" / "deep.tif").write_bytes(b"x")  # not recursive
    (tmp_path / "single.tiff").write_bytes(b"x")
    got = io.expand_inputs([str(folder), str(tmp_path / "*.tiff"), str(tmp_path / "missing.tif"),
                            str(tmp_path / "nothing*.png"), str(folder / "a.png")])
    assert got == [folder / "a.png", folder / "b.tif", folder / "c.npy",
                   tmp_path / "single.tiff", tmp_path / "missing.tif",
                   tmp_path / "nothing*.png"]  # a.png only once; missing ones kept for reporting
    assert "no such file" in _one_line_error(got[-1])


def test_output_stem():
    assert io.output_stem("a/b/img.ome.tif") == "img"
    assert io.output_stem("x.y.png") == "x.y"


# -- writing ---------------------------------------------------------------------------------

def test_labels_tiff_dtype_and_roundtrip(tmp_path):
    small = np.zeros((30, 40), np.int64)
    small[5:10, 5:10] = 3
    path = io.write_labels_tiff(tmp_path / "l.tif", small)
    back = tifffile.imread(path)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, small)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression != tifffile.COMPRESSION.NONE
    big = small.copy()
    big[0, 0] = 70000
    assert tifffile.imread(io.write_labels_tiff(tmp_path / "b.tif", big)).dtype == np.uint32
    with pytest.raises(ValueError):
        io.write_labels_tiff(tmp_path / "neg.tif", -small)


def test_atomic_write_failure_leaves_nothing(tmp_path):
    def explode(fh):
        fh.write(b"partial data")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        io.atomic_write(tmp_path / "out.bin", explode)
    assert list(tmp_path.iterdir()) == []

    # An existing file survives a failed rewrite untouched.
    target = io.write_table_csv(tmp_path / "t.csv", [{"label": 1, "area": 4}])
    before = target.read_bytes()
    with pytest.raises(ValueError):
        io.write_table_csv(target, [{"label": 1, "unexpected": 2}], columns=["label"])
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_atomic_write_failure_inside_tifffile(tmp_path, monkeypatch):
    def broken_imwrite(fh, *a, **k):
        fh.write(b"II*\x00half a tiff")
        raise OSError("No space left on device")

    monkeypatch.setattr("cellsam_rt.io.outputs.tifffile.imwrite", broken_imwrite)
    with pytest.raises(OSError):
        io.write_labels_tiff(tmp_path / "l.tif", np.ones((4, 4), np.uint16))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_written_files_get_normal_permissions(tmp_path):
    path = io.write_png(tmp_path / "p.png", np.zeros((4, 4, 3), np.uint8))
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_csv_and_png_contents(tmp_path):
    rows = [{"label": np.int32(1), "area": np.int64(10), "mean": np.float32(0.5)},
            {"label": 2, "area": 3, "mean": 1.25}]
    text = io.write_table_csv(tmp_path / "c.csv", rows).read_text()
    assert text == "label,area,mean\n1,10,0.5\n2,3,1.25\n"
    assert io.write_table_csv(tmp_path / "e.csv", [], columns=["label", "area"]).read_text() \
        == "label,area\n"
    table = np.array([(1, 10, 0.5), (2, 3, np.nan)],
                     dtype=[("label", "u4"), ("area", "i8"), ("score", "f4")])
    assert io.write_table_csv(tmp_path / "s.csv", table).read_text() \
        == "label,area,score\n1,10,0.5\n2,3,nan\n"
    assert io.write_table_csv(tmp_path / "s0.csv", table[:0]).read_text() == "label,area,score\n"
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 255
    back = cv2.imread(str(io.write_png(tmp_path / "p.png", rgb)))
    assert (back[..., 2] == 255).all() and (back[..., :2] == 0).all()  # red, in cv2's BGR


def test_overlay_outlines_marks_cell_borders():
    image = np.random.default_rng(4).integers(0, 1000, (20, 20, 2)).astype(np.uint16)
    labels = np.zeros((20, 20), np.int32)
    labels[5:10, 5:10] = 1
    labels[5:10, 10:15] = 2
    rgb = io.overlay_outlines(image, labels)
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    yellow = (rgb == (255, 255, 0)).all(axis=2)
    assert yellow[5, 5] and yellow[9, 9] and yellow[7, 9] and yellow[7, 10]  # border + seam
    assert not yellow[7, 7] and not yellow[0, 0]  # interior and background
    with pytest.raises(ValueError):
        io.overlay_outlines(image, labels[:10])


def test_prepare_output_dir(tmp_path):
    made = io.prepare_output_dir(tmp_path / "new" / "deeper")
    assert made.is_dir()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="file.txt"):
        io.prepare_output_dir(blocker)
    with pytest.raises(OutputDirError, match="cannot write there"):
        io.prepare_output_dir(blocker / "sub")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_prepare_output_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="ro"):
            io.prepare_output_dir(ro)
    finally:
        ro.chmod(0o700)
