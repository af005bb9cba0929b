"""Real labelled training images: RGBA instance masks, augmented crops, mixing into the stream."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")  # cellsam_train needs the [export] extra
import tifffile  # noqa: E402

from cellsam_train.real_data import RealImages, find_pairs, read_instance_png  # noqa: E402
from cellsam_train.train import SynthStream  # noqa: E402


def _disc_image(n: int, size: int, radius: int, rng: np.random.Generator):
    """(uint16 image, labels) of n bright non-overlapping discs."""
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    k = 0
    for _ in range(200):
        if k == n:
            break
        cy, cx = rng.integers(radius, size - radius, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        if labels[disc].any():
            continue
        k += 1
        labels[disc] = k
    image = (500 + 3000 * (labels > 0) + rng.normal(0, 30, labels.shape)).astype(np.uint16)
    return image, labels


def _write_set(root, name: str, image: np.ndarray, labels: np.ndarray, colours) -> None:
    (root / "set" / "images").mkdir(parents=True, exist_ok=True)
    (root / "set" / "nucleus_masks").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "set" / "images" / f"{name}.tif", image)
    rgba = np.zeros(labels.shape + (4,), np.uint8)
    for k in range(1, labels.max() + 1):
        rgba[labels == k] = colours[k - 1]
    Image.fromarray(rgba, "RGBA").save(root / "set" / "nucleus_masks" / f"{name}.png")


@pytest.fixture()
def real_root(tmp_path):
    rng = np.random.default_rng(0)
    image, labels = _disc_image(12, 160, 10, rng)
    colours = [(int(c[0]), int(c[1]), int(c[2]), 255) for c in rng.integers(0, 256, (12, 3))]
    _write_set(tmp_path, "a", image, labels, colours)
    (tmp_path / "set" / "images" / "unlabelled.tif").write_bytes(b"")  # no mask: skipped
    return tmp_path, labels


def test_each_colour_is_one_instance(real_root):
    root, labels = real_root
    (pair,) = find_pairs(root)
    got = read_instance_png(pair[1])
    assert got.max() == labels.max() and (got == 0).sum() == (labels == 0).sum()
    for k in range(1, labels.max() + 1):  # one-to-one correspondence of instances
        assert len(np.unique(got[labels == k])) == 1


def test_crops_follow_the_target_diameter_and_match_their_labels(real_root):
    root, _ = real_root
    real = RealImages(root)
    rng = np.random.default_rng(1)
    for _ in range(10):
        image, labels = real.sample(rng, 64, diameter_range=(30.0, 30.0))
        assert image.shape == labels.shape and image.dtype == np.uint16
        # native discs are ~21 px across; 30 px after resizing the crop to 64 -> side ~45 px
        assert 40 <= image.shape[0] <= 50
        ids = np.unique(labels)[1:]
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))
        if len(ids):
            inside = image[labels > 0].astype(float).mean()
            outside = image[labels == 0].astype(float).mean()
            assert inside != outside  # labels sit on the discs (bright, or dark if inverted)


def test_stream_mixes_real_and_synthetic_examples(real_root):
    root, _ = real_root
    class Counting(RealImages):
        calls = 0

        def sample(self, rng, size, **kw):
            Counting.calls += 1
            return super().sample(rng, size, **kw)

    stream = SynthStream(0, 64, real=Counting(root), real_fraction=0.5)
    for i in range(30):
        image, labels = stream.sample(i)
        assert image.shape[:2] == labels.shape
    assert 5 < Counting.calls < 25
    again = SynthStream(0, 64, real=RealImages(root), real_fraction=0.5)
    a, b = stream.sample(3), again.sample(3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_a_folder_without_pairs_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        RealImages(tmp_path)


def test_stream_replays_a_share_from_an_earlier_generator_version():
    from cellsam_train.synth import generate

    stream = SynthStream(0, 96, version=4, replay_version=3, replay_fraction=0.5)
    plain = SynthStream(0, 96, version=4)
    same = [np.array_equal(stream.sample(i)[0], plain.sample(i)[0]) for i in range(12)]
    assert 2 <= sum(same) <= 10  # the rest came from version 3
    for i, kept in enumerate(same):
        if not kept:
            assert np.array_equal(stream.sample(i)[0], generate(i, model_size=96, version=3).image)


def test_objects_of_another_class_are_unlabelled_not_background(real_root):
    """mnfinder paints micronuclei in mn_masks/: they come back as UNLABELLED, the nuclei and the
    crops themselves exactly as without that folder."""
    from cellsam_train.real_data import UNLABELLED

    root, labels = real_root
    plain = RealImages(root)
    plain._load()  # before mn_masks/ exists
    other = np.zeros(labels.shape, np.int32)
    yy, xx = np.mgrid[:labels.shape[0], :labels.shape[1]]
    spots = [(y, x) for y, x in np.argwhere(labels == 0)[::997]
             if (labels[max(y - 3, 0):y + 4, max(x - 3, 0):x + 4] == 0).all()]
    for k, (y, x) in enumerate(spots[:8], start=1):
        other[((yy - y) ** 2 + (xx - x) ** 2 <= 4) & (labels == 0)] = k
    assert other.max() >= 4
    (root / "set" / "mn_masks").mkdir()
    rgba = np.zeros(labels.shape + (4,), np.uint8)
    rgba[other > 0] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(root / "set" / "mn_masks" / "a.png")
    marked = RealImages(root)
    ((_, full, _),) = marked._load()
    assert np.array_equal(full == UNLABELLED, other > 0)
    assert np.array_equal(full > 0, labels > 0)
    seen = 0
    for seed in range(12):
        img_a, lab_a = plain.sample(np.random.default_rng(seed), 64)
        img_b, lab_b = marked.sample(np.random.default_rng(seed), 64)
        assert np.array_equal(img_a, img_b)  # same crop, same augmentation
        assert np.array_equal(np.maximum(lab_b, 0), lab_a)
        assert lab_a[lab_b == UNLABELLED].max(initial=0) == 0  # only background pixels change
        seen += int((lab_b == UNLABELLED).sum())
    assert seen > 0


def test_stream_draws_a_share_with_a_regime_forced():
    from cellsam_train.synth import generate

    stream = SynthStream(0, 96, version=5, focus_regime="hazy", focus_fraction=0.5)
    focus = [i for i in range(12) if stream.source(i) == "focus"]
    assert 2 <= len(focus) <= 10
    for i in range(12):
        regime = "hazy" if i in focus else None
        want = generate(i, model_size=96, version=5, regime=regime).image
        assert np.array_equal(stream.sample(i)[0], want)
