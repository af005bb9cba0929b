"""Strict CellSAM checkpoint loading and saving, plus random state dicts for testing the loader.

The reference loads with strict=False, so a checkpoint that does not fit the model passes
silently and gives garbage; here every missing key, unexpected key and shape mismatch is
reported and the checkpoint refused. Loading never executes code (weights_only=True).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from .build import (CellSAMConfig, build_cellsam, config_name, config_to_dict,
                    resolve_config)
from .modeling.cellsam import CellSAM

DEFAULT_TSV = Path(__file__).resolve().parents[2] / "tests" / "data" / "cellsam_v1.2_state_dict.tsv"
_LIST_LIMIT = 10

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
           "bool": torch.bool, "uint8": torch.uint8}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit the model it claims to be."""


def read_tsv(path: str | os.PathLike | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """Parse a key listing (NAME<TAB>DTYPE<TAB>SHAPE, '#' comments) into (key, dtype, shape) rows."""
    rows = []
    for line in Path(path or DEFAULT_TSV).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, dtype, shape = (line.split("\t") + [""])[:3]
        rows.append((key, dtype, tuple(int(s) for s in shape.split(",") if s.strip())))
    return rows


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (identifies the source checkpoint in manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A finite, well-scaled random value for one parameter, chosen by its name and shape."""
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("transformer.position.weight"):
        # Anchor points live in [0,1]; keep them off the edges where inverse_sigmoid clamps.
        t = torch.rand(shape, generator=gen) * 0.9 + 0.05
    elif leaf == "weight" and len(shape) == 1:
        # 1-D weights are norm scales (LayerNorm, LayerNorm2d, GroupNorm).
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif leaf == "positional_encoding_gaussian_matrix":
        t = torch.randn(shape, generator=gen)
    else:
        t = 0.02 * torch.randn(shape, generator=gen)
    return t.to(dtype)


def random_state_dict(config: CellSAMConfig | str | dict = "full", with_model_cp: bool = True,
                      seed: int = 0, tsv_path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Random but sane weights with a checkpoint's exact names and shapes (to test loading and export).

    For "full" the names and shapes come from the official key listing itself, so loading the
    result proves the loader against the real checkpoint layout; other configs use the built
    model's own state dict.
    """
    cfg = resolve_config(config)
    gen = torch.Generator().manual_seed(seed)
    if cfg == resolve_config("full"):
        spec = [(k, _DTYPES[d], s) for k, d, s in read_tsv(tsv_path)]
    else:
        model = build_cellsam(cfg, with_model_cp=with_model_cp)
        spec = [(k, v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()]
    return {k: _random_tensor(k, s, d, gen) for k, d, s in spec
            if with_model_cp or not k.startswith("model_cp.")}


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                    config: CellSAMConfig | str | dict | None = None) -> Path:
    """Write a checkpoint atomically: flat for the full model (like the official files), else with its config."""
    path = Path(path)
    cfg = resolve_config(config) if config is not None else None
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    obj: Any = sd if cfg is None or config_name(cfg) == "full" else {
        "state_dict": sd, "cellsam_rt_config": config_to_dict(cfg)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _load_reason(e: Exception) -> str:
    """Short reason for a failed torch.load, without torch's advice to disable weights_only."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # the specific cause follows (e.g. an unsupported global)
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return f"{type(e).__name__}: {' '.join(text.split())[:200]}"


def _torch_load(path: Path) -> Any:
    """torch.load without code execution; memory-mapped when the file allows (saves a copy of ~1 GB)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        # Legacy (non-zip) files cannot be mapped; a plain load also gives the real error.
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a checkpoint file safely -> (state dict, stored config dict or None)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a directory, not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: file is empty")
    try:
        obj = _torch_load(path)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(
            f"checkpoint {path}: not a readable PyTorch checkpoint of tensors ({_load_reason(e)})") from e
    stored_config = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        stored_config = obj.get("cellsam_rt_config")
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {path}: not a state dict of tensors ({len(bad)} entries are not tensors, "
            f"e.g. {[str(k) for k in bad[:_LIST_LIMIT]]})")
    if not obj:
        raise CheckpointError(f"checkpoint {path}: state dict is empty")
    if stored_config is not None and not isinstance(stored_config, dict):
        raise CheckpointError(f"checkpoint {path}: cellsam_rt_config is not a dict")
    return obj, stored_config


def _listing(title: str, items: list[str]) -> str:
    """'title (n): a, b, ... and m more' for an error message."""
    head = ", ".join(items[:_LIST_LIMIT])
    more = f" ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"{title} ({len(items)}): {head}{more}"


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module,
                     source: str = "state dict") -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches against `model`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (expected {list(expected[k])}, got {list(state_dict[k].shape)})"
                  for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        parts = [_listing(t, items) for t, items in (("missing keys", missing),
                                                    ("unexpected keys", unexpected),
                                                    ("shape mismatches", mismatched)) if items]
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))


def load_checkpoint(path: str | os.PathLike, config: CellSAMConfig | str | dict | None = None
                    ) -> tuple[CellSAM, dict[str, Any]]:
    """Load a CellSAM checkpoint strictly -> (model in eval mode, info about the source).

    Accepts a flat state dict or {"state_dict": ...}. The config is `config` if given, else the
    one stored in the file, else the official "full" sizes. `model_cp` is built when its keys
    are present. info: path, sha256, has_model_cp, config (name, or dict if custom), config_name.
    """
    path = Path(path)
    state_dict, stored = _read_file(path)
    try:
        cfg = resolve_config(config if config is not None else (stored if stored is not None else "full"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: bad config ({e})") from e
    has_cp = any(k.startswith("model_cp.") for k in state_dict)
    model = build_cellsam(cfg, with_model_cp=has_cp)
    check_state_dict(state_dict, model, source=f"checkpoint {path}")
    model.load_state_dict(state_dict, strict=True)
    name = config_name(cfg)
    info = {"path": str(path), "sha256": sha256_file(path), "has_model_cp": has_cp,
            "config": name if name is not None else config_to_dict(cfg),
            "config_name": name if name is not None else "custom"}
    return model.eval(), info


__all__ = ["CheckpointError", "read_tsv", "sha256_file", "random_state_dict", "save_checkpoint",
           "check_state_dict", "load_checkpoint", "DEFAULT_TSV"]
