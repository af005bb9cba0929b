"""Strict checkpoint loading: the official key layout loads, anything that does not fit is refused."""
from __future__ import annotations

import hashlib
import os
import pickle

import pytest

torch = pytest.importorskip("torch")

from cellsam_export.build import CONFIGS, build_cellsam, config_to_dict  # noqa: E402
from cellsam_export.checkpoint import (CheckpointError, check_state_dict,  # noqa: E402
                                       load_checkpoint, random_state_dict, read_tsv,
                                       save_checkpoint, sha256_file)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tsv(tsv_path):
    """The official listing as {key: shape}."""
    return {k: s for k, _, s in read_tsv(tsv_path)}


def test_tsv_listing_is_complete(tsv):
    assert len(tsv) == 1041
    assert tsv["cellfinder.decode_head.transformer.position.weight"] == (3500, 2)
    assert tsv["model.image_encoder.pos_embed"] == (1, 64, 64, 768)


@pytest.fixture(scope="module")
def full_sd():
    """Random weights for every key of the official listing (built from the listing itself)."""
    return random_state_dict("full", with_model_cp=True, seed=0)


@pytest.fixture(scope="module")
def full_model_cp():
    """The full-size model with model_cp (built once; ~2 s)."""
    return build_cellsam("full", with_model_cp=True)


@pytest.mark.parametrize("with_cp", [False, True])
def test_full_model_keys_equal_the_official_listing(tsv, with_cp, full_model_cp):
    model = full_model_cp if with_cp else build_cellsam("full")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: s for k, s in tsv.items() if with_cp or not k.startswith("model_cp.")}
    assert got == want


def test_full_checkpoint_from_listing_loads_strictly_with_model_cp(tmp_path, tsv, full_sd):
    sd = full_sd
    assert {k: tuple(v.shape) for k, v in sd.items()} == tsv
    path = save_checkpoint(tmp_path / "cellsam_general.pt", sd)
    raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    assert "state_dict" not in raw and len(raw) == 1041  # flat, like the official files
    del raw
    model, info = load_checkpoint(path)
    assert info["has_model_cp"] and model.has_model_cp and model.sam is model.model_cp
    assert info["config"] == "full" and info["config_name"] == "full"
    assert info["path"] == str(path)
    assert len(info["sha256"]) == 64 and int(info["sha256"], 16) >= 0
    for key in ("model_cp.image_encoder.blocks.11.attn.rel_pos_h",
                "cellfinder.decode_head.transformer.position.weight",
                "model.mask_decoder.iou_token.weight"):
        torch.testing.assert_close(model.state_dict()[key], sd[key], rtol=0, atol=0)
    assert not model.training


def test_full_state_dict_without_model_cp_fits(tsv, full_sd):
    sd = {k: v for k, v in full_sd.items() if not k.startswith("model_cp.")}
    assert set(sd) == {k for k in tsv if not k.startswith("model_cp.")}
    model = build_cellsam("full")
    check_state_dict(sd, model)  # raises on any difference
    model.load_state_dict(sd, strict=True)
    assert not model.has_model_cp and model.sam is model.model


def test_full_state_dict_refused_by_a_model_with_model_cp(full_sd, full_model_cp):
    sd = {k: v for k, v in full_sd.items() if not k.startswith("model_cp.")}
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): model_cp\."):
        check_state_dict(sd, full_model_cp)


def test_random_state_dict_values_are_sane():
    sd = random_state_dict("tiny", with_model_cp=False, seed=0)
    assert all(torch.isfinite(v).all() for v in sd.values())
    pos = sd["cellfinder.decode_head.transformer.position.weight"]
    assert pos.min() > 0 and pos.max() < 1
    norm = sd["cellfinder.decode_head.transformer.encoder_layers.0.norm1.weight"]
    assert 0.5 < norm.mean() < 1.5  # norm scales near one, not near zero
    again = random_state_dict("tiny", with_model_cp=False, seed=0)
    other = random_state_dict("tiny", with_model_cp=False, seed=1)
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    assert not torch.equal(sd["model.image_encoder.pos_embed"], other["model.image_encoder.pos_embed"])


def _tiny_sd(with_cp=False):
    return random_state_dict("tiny", with_model_cp=with_cp, seed=2)


def test_wrapped_and_flat_tiny_checkpoints_load(tmp_path):
    sd = _tiny_sd(with_cp=True)
    wrapped = save_checkpoint(tmp_path / "wrapped.pt", sd, config="tiny")
    raw = torch.load(wrapped, weights_only=True)
    assert raw["cellsam_rt_config"] == config_to_dict(CONFIGS["tiny"])
    model, info = load_checkpoint(wrapped)
    assert info["config_name"] == "tiny" and info["has_model_cp"]
    assert model.config == CONFIGS["tiny"]

    flat = tmp_path / "flat.pt"
    torch.save(sd, flat)
    model2, info2 = load_checkpoint(flat, config="tiny")
    assert info2["config_name"] == "tiny"
    for k in sd:
        assert torch.equal(model.state_dict()[k], model2.state_dict()[k])

    # {"state_dict": ...} without our config: sizes must be given (official files carry none).
    bare = tmp_path / "bare.pt"
    torch.save({"state_dict": sd}, bare)
    model3, _ = load_checkpoint(bare, config=CONFIGS["tiny"])
    assert torch.equal(model3.state_dict()["model.mask_decoder.iou_token.weight"],
                       sd["model.mask_decoder.iou_token.weight"])


def test_custom_config_is_reported_as_dict(tmp_path):
    import dataclasses
    cfg = dataclasses.replace(CONFIGS["tiny"], num_queries=7)
    path = save_checkpoint(tmp_path / "c.pt", random_state_dict(cfg, with_model_cp=False), config=cfg)
    model, info = load_checkpoint(path)
    assert info["config_name"] == "custom" and info["config"]["num_queries"] == 7
    assert model.cellfinder.num_queries == 7


def _expect_refusal(tmp_path, sd, *patterns, config="tiny"):
    path = save_checkpoint(tmp_path / "bad.pt", sd, config=config)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg
    for p in patterns:
        assert p in msg, msg
    return msg


def test_missing_key_is_refused_and_named(tmp_path):
    sd = _tiny_sd()
    del sd["cellfinder.decode_head.transformer.pattern.weight"]
    _expect_refusal(tmp_path, sd, "missing keys (1)", "cellfinder.decode_head.transformer.pattern.weight")


def test_unexpected_key_is_refused_and_named(tmp_path):
    sd = _tiny_sd()
    sd["cellfinder.decode_head.transformer.level_embed.weight"] = torch.zeros(3, 64)
    _expect_refusal(tmp_path, sd, "unexpected keys (1)", "cellfinder.decode_head.transformer.level_embed.weight")


def test_wrong_shape_is_refused_with_both_shapes(tmp_path):
    sd = _tiny_sd()
    sd["cellfinder.decode_head.transformer.position.weight"] = torch.rand(49, 2)
    _expect_refusal(tmp_path, sd, "shape mismatches (1)",
                    "cellfinder.decode_head.transformer.position.weight (expected [50, 2], got [49, 2])")


def test_long_lists_are_truncated_with_counts(tmp_path):
    sd = _tiny_sd()
    gone = [k for k in sd if k.startswith("model.image_encoder.blocks.0.")]
    assert len(gone) > 10
    for k in gone:
        del sd[k]
    msg = _expect_refusal(tmp_path, sd, f"missing keys ({len(gone)})", f"and {len(gone) - 10} more")
    assert sum(k in msg for k in gone) == 10


def test_tiny_weights_refused_as_full(tmp_path):
    path = tmp_path / "tiny_flat.pt"
    torch.save(_tiny_sd(), path)  # no config stored -> treated as the official full model
    with pytest.raises(CheckpointError, match=r"shape mismatches .*model\.image_encoder\.pos_embed "
                                              r"\(expected \[1, 64, 64, 768\], got \[1, 16, 16, 64\]\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "directory", "list", "not_tensors", "empty_dict"])
def test_unreadable_files_name_the_file_and_reason(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    reason = {"missing": "no such file", "empty": "empty", "garbage": "not a readable PyTorch checkpoint",
              "directory": "directory", "list": "not a state dict", "not_tensors": "not tensors",
              "empty_dict": "state dict is empty"}[kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(64) + b"this is not a checkpoint")
    elif kind == "directory":
        path.mkdir()
    elif kind == "list":
        torch.save([torch.zeros(1)], path)
    elif kind == "not_tensors":
        torch.save({"model.x": 1.0, "model.y": torch.zeros(1)}, path)
    elif kind == "empty_dict":
        torch.save({}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and reason in str(err.value)
    assert isinstance(err.value, ValueError)


class _Payload:
    """A pickle that would create a file if unpickled with code execution allowed."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickled_code_is_never_executed(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model.x": _Payload(str(target))}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not target.exists()


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path):
    sd = _tiny_sd()
    path = save_checkpoint(tmp_path / "sub" / "m.pt", sd, config="tiny")
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    _, info = load_checkpoint(path)
    assert info["sha256"] == sha256_file(path)
    # Saving again over an existing file replaces it whole.
    sd2 = random_state_dict("tiny", with_model_cp=False, seed=9)
    save_checkpoint(path, sd2, config="tiny")
    model, _ = load_checkpoint(path)
    assert torch.equal(model.state_dict()["model.image_encoder.pos_embed"], sd2["model.image_encoder.pos_embed"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]


def test_legacy_serialisation_still_loads(tmp_path):
    sd = _tiny_sd()
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": sd, "cellsam_rt_config": config_to_dict(CONFIGS["tiny"])}, path,
               _use_new_zipfile_serialization=False)
    model, info = load_checkpoint(path)
    assert info["config_name"] == "tiny"
    assert torch.equal(model.state_dict()["model.image_encoder.pos_embed"], sd["model.image_encoder.pos_embed"])
