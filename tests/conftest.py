"""Shared fixtures: small exported models made once per session, thread limits for a 2-core CI."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep BLAS/ORT/torch from oversubscribing the two CI cores when tests run side by side.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
TSV = REPO / "tests" / "data" / "cellsam_v1.2_state_dict.tsv"


@pytest.fixture(scope="session")
def tsv_path() -> Path:
    """The official checkpoint's key/dtype/shape listing (a copy of shared/)."""
    return TSV


def _make_model_dir(tmp_path_factory, name: str, with_model_cp: bool,
                    cpu_graphs: bool = True) -> Path:
    testing = pytest.importorskip("cellsam_export.testing")
    out = tmp_path_factory.mktemp(name) / "model"
    return testing.make_model_dir(out, config="tiny", with_model_cp=with_model_cp, seed=0, fp16=True,
                                  cpu_graphs=cpu_graphs)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight CellSAM exported to a model directory (no model_cp)."""
    return _make_model_dir(tmp_path_factory, "tiny", with_model_cp=False)


@pytest.fixture(scope="session")
def tiny_model_dir_cp(tmp_path_factory) -> Path:
    """The same tiny model with a `model_cp` SAM copy (the adversarial-mode preprocessing).

    Portable graphs only: the fused CPU variants are exercised by `tiny_model_dir`, and each
    graph export costs seconds of the suite."""
    return _make_model_dir(tmp_path_factory, "tiny_cp", with_model_cp=True, cpu_graphs=False)
