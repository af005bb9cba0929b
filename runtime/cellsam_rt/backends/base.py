"""The interface every inference backend implements: run a named graph on numpy inputs."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from cellsam_rt.errors import BackendError  # noqa: F401  (re-exported: backends raise it)


class Backend(ABC):
    """Runs the model directory's graphs ("encoder", "cellfinder", "decoder") by name."""

    #: short backend name as given on the command line ("cpu", "cuda", "tensorrt-ep", ...)
    name: str = "backend"
    #: boxes per mask-decoder call when the caller does not say (a GPU wants large batches)
    decoder_chunk_size: int = 32

    @property
    @abstractmethod
    def providers(self) -> list[str]:
        """Execution providers (or engines) this backend runs on, most preferred first."""

    @abstractmethod
    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `graph` on `inputs` (name -> array) and return its outputs by name."""

    def has_graph(self, graph: str) -> bool:
        """Whether this backend can run `graph`; the optional graphs (config.OPTIONAL_GRAPHS)
        only where a backend says so."""
        return False

    def concurrent_runs(self, graph: str) -> int:
        """How many calls of `graph` the caller may run at once (threads of its own)."""
        return 1

    def graph_inputs(self, graph: str) -> tuple[str, ...]:
        """Names of `graph`'s inputs (graphs of older exports may take fewer); () where the
        backend cannot tell. A backend that runs an optional graph lists them."""
        return ()

    def describe(self) -> str:
        """One line saying what runs where, for logs and benchmark reports."""
        return f"{self.name} ({', '.join(self.providers)})"

    def close(self) -> None:
        """Release sessions/engines; the backend may be used again afterwards (it reloads)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
