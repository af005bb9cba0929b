"""Random-weight checkpoints and model directories for tests, demos and benchmarks."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

__all__ = ["make_random_checkpoint", "make_model_dir"]


def make_random_checkpoint(
    path: Union[str, Path], config: str = "tiny", with_model_cp: bool = False, seed: int = 0
) -> Path:
    """Write a random-weight checkpoint of a named config (with its config embedded) to `path`."""
    from cellsam_export.build import CONFIGS
    from cellsam_export.checkpoint import random_state_dict, save_checkpoint

    cfg = CONFIGS[config] if isinstance(config, str) else config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(cfg, with_model_cp=with_model_cp, seed=seed)
    save_checkpoint(path, sd, cfg)
    return path


def make_model_dir(
    out: Union[str, Path],
    config: str = "tiny",
    with_model_cp: bool = False,
    seed: int = 0,
    fp16: bool = True,
    opset: int = 18,
    force: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    cpu_graphs: bool = True,
) -> Path:
    """Export a random-weight model of a named config into the model directory `out`."""
    import tempfile

    from cellsam_export.onnx_export import export_model_dir

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The checkpoint goes through the real file round trip (save + strict load) so that the
    # manifest's sha256 and config name are those a user's export would record.
    with tempfile.TemporaryDirectory(prefix=".ckpt-", dir=out.parent) as tmp:
        ckpt = make_random_checkpoint(Path(tmp) / f"cellsam_random_{config}_seed{seed}.pt",
                                      config=config, with_model_cp=with_model_cp, seed=seed)
        return export_model_dir(ckpt, out, fp16=fp16, opset=opset, force=force, progress=progress,
                                cpu_graphs=cpu_graphs)
