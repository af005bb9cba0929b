"""The plugin's model side, free of Qt: loaded Segmenters kept per option set, cancellation
between graph calls, and image embeddings kept so that each box prompt costs only the decoder."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from cellsam_rt.backends import Backend, create_backend
from cellsam_rt.pipeline import Segmenter

__all__ = ["Cancelled", "Engine", "ModelOptions", "get_engine", "parse_channels"]

#: bytes of encoder outputs kept per engine (the full CellSAM embedding is 4 MiB per image/tile)
EMBEDDING_CACHE_BYTES = 512 << 20
#: bytes of preprocessed images kept per engine (HxWx3 float64: 6 MiB for 512x512)
PREPARED_CACHE_BYTES = 256 << 20


class Cancelled(Exception):
    """Raised inside a segmentation job when the user cancelled it."""


@dataclass(frozen=True)
class ModelOptions:
    """What makes one loaded Segmenter differ from another."""

    model: str = "default"
    backend: str = "cpu"
    precision: str = "fp32"
    tile: str = "auto"
    polarity: str = "auto"
    outline: str = "auto"
    denoise: str = "auto"
    augment: str = "auto"


def parse_channels(text: str) -> Optional[tuple[int, ...]]:
    """"" -> None (automatic); "0" or "0,1" -> nuclear (and whole-cell) channel indices."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"channels must be NUCLEAR or NUCLEAR,WHOLECELL indices, got {text!r}") \
            from None
    if not 1 <= len(values) <= 2 or any(v < 0 for v in values):
        raise ValueError(f"channels must be one or two indices >= 0, got {text!r}")
    return values


def _digest(arr: np.ndarray, extra: str = "") -> str:
    """Content key of an array (shape, dtype and bytes)."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.shape}{arr.dtype}{extra}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


class _ByteLRU:
    """A small least-recently-used map bounded by the bytes of its values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: str):
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value, nbytes: int) -> None:
        if nbytes > self.max_bytes or key in self._items:
            return
        self._items[key] = (value, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes:
            _, (_, n) = self._items.popitem(last=False)
            self._bytes -= n

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


class _EngineBackend(Backend):
    """Wraps a backend: reuses recent encoder outputs and stops a cancelled job at the next graph
    call (encoder, CellFinder, each decoder chunk)."""

    def __init__(self, inner: Backend, max_bytes: int = EMBEDDING_CACHE_BYTES) -> None:
        self.inner = inner
        self.name = inner.name
        self.decoder_chunk_size = inner.decoder_chunk_size
        self.cache = _ByteLRU(max_bytes)
        self.cancel: Optional[threading.Event] = None
        self.encoder_runs = 0   # encoder calls that missed the cache
        self.decoder_runs = 0

    @property
    def providers(self) -> list[str]:
        return self.inner.providers

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        self.cache.clear()
        self.inner.close()

    def run(self, graph: str, inputs: dict) -> dict:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()
        if graph == "decoder":
            self.decoder_runs += 1
        if graph != "encoder":
            return self.inner.run(graph, inputs)
        key = _digest(inputs["image"])
        out = self.cache.get(key)
        if out is None:
            out = self.inner.run(graph, inputs)
            self.encoder_runs += 1
            for v in out.values():
                v.flags.writeable = False  # shared between jobs
            self.cache.put(key, out, sum(v.nbytes for v in out.values()))
        return dict(out)


class Engine:
    """One loaded Segmenter and its caches; jobs on it run one at a time."""

    def __init__(self, options: ModelOptions) -> None:
        self.options = options
        self.backend = _EngineBackend(create_backend(options.model, backend=options.backend,
                                                     precision=options.precision))
        self.segmenter = Segmenter(model=options.model, backend=self.backend, tile=options.tile,
                                   polarity=options.polarity, outline=options.outline,
                                   denoise=options.denoise, augment=options.augment)
        self._prepared = _ByteLRU(PREPARED_CACHE_BYTES)
        self._lock = threading.Lock()

    def segment(self, image: np.ndarray, channels=None, boxes: Optional[np.ndarray] = None,
                cancel: Optional[threading.Event] = None,
                progress: Optional[Callable[[int, int], None]] = None):
        """Segment one 2-D image (YX or YXC); stops with Cancelled once `cancel` is set."""
        with self._lock:
            seg = self.segmenter

            def on_progress(done: int, total: int) -> None:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                if progress is not None:
                    progress(done, total)

            self.backend.cancel, seg.progress = cancel, on_progress
            try:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                prepared = self._prepare(image, channels)
                return seg.segment(image, channels=channels, boxes=boxes, prepared=prepared)
            finally:
                self.backend.cancel, seg.progress = None, None

    def _prepare(self, image: np.ndarray, channels):
        """The preprocessed image, computed once per image content and channel choice."""
        key = _digest(np.asarray(image), repr(channels))
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self.segmenter.prepare(image, channels)
            nbytes = sum(a.nbytes for a in (prepared.img3, prepared.encoder_in,
                                            prepared.cellfinder_in) if a is not None)
            self._prepared.put(key, prepared, nbytes)
        return prepared

    def clear_cache(self) -> None:
        """Forget kept embeddings and preprocessed images."""
        self.backend.cache.clear()
        self._prepared.clear()


_ENGINES: dict[ModelOptions, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(options: ModelOptions) -> Engine:
    """The Engine for these options, loaded on first use and kept for the process."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(options)
        if engine is None:
            engine = _ENGINES[options] = Engine(options)
        return engine
