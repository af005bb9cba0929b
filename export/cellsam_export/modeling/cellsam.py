"""CellSAM as one module whose state dict has exactly the official checkpoint's keys."""
from __future__ import annotations

from typing import Any

from torch import nn

from .sam import Sam


class CellSAM(nn.Module):
    """SAM (`model`), optional adversarially tuned SAM copy (`model_cp`) and the box detector (`cellfinder`)."""

    def __init__(self, model: Sam, cellfinder: nn.Module, model_cp: Sam | None = None,
                 config: Any = None) -> None:
        super().__init__()
        self.model = model
        self.cellfinder = cellfinder
        # None is a plain attribute, not a submodule: a model without it has no `model_cp.*` keys.
        self.model_cp = model_cp
        self.config = config

    @property
    def has_model_cp(self) -> bool:
        """Whether the checkpoint carries the second SAM (it changes preprocessing, docs/design.md §2.4-2.5)."""
        return self.model_cp is not None

    @property
    def sam(self) -> Sam:
        """The SAM used at inference: `model_cp` when present, as in the reference."""
        return self.model_cp if self.model_cp is not None else self.model
