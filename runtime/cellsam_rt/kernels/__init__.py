"""cellsam-rt's own CPU kernels for ONNX Runtime: a C++ custom-op library built at install.

`com.cellsam.RelPosAttention` is SAM's global attention with decomposed relative positions
(relpos_attention.cc). ONNX Runtime's CPU flash attention takes no additive bias, so without it
the CPU trunks fold rel_h/rel_w into one-hot q/k columns (3x the q.k arithmetic); the kernel adds
them per tile instead (0.22 s per full-size global block against 0.34 s, 2 vCPUs, 8 such
blocks per image; benchmarks/test_bench_attention.py). Exported CPU trunks list the ops they need in the manifest
(`cpu_custom_ops`); where this library cannot serve them the backend runs the plain graphs.

The library is optional: setup.py skips it without a C++ compiler. Its vector paths need
AVX-512 or AVX2 + FMA (x86-64); elsewhere `status()` says why it is not used.
$CELLSAM_RT_KERNEL_ISA=avx2|portable caps the path (read per call; for tests and comparisons).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

DOMAIN = "com.cellsam"
PROVIDED = ("com.cellsam.RelPosAttention",)
_HERE = Path(__file__).resolve().parent
ISA_NAMES = ("portable", "AVX2", "AVX-512")


def library_path() -> Path | None:
    """The compiled library next to this file, or None when the install built none."""
    found = sorted(_HERE.glob("_kernels*.so")) + sorted(_HERE.glob("_kernels*.dylib"))
    return found[0] if found else None


@functools.lru_cache(maxsize=1)
def status() -> tuple[bool, str]:
    """(usable, reason): whether the CPU backend may run graphs that need PROVIDED ops."""
    path = library_path()
    if path is None:
        return False, (f"cellsam-rt's kernel library is not built in {_HERE} (reinstall with a "
                       "C++ compiler: pip install --force-reinstall cellsam-rt)")
    try:
        isa = int(ctypes.CDLL(str(path)).cellsam_kernels_isa())
    except (OSError, AttributeError) as exc:
        return False, f"{path}: cannot load cellsam-rt's kernel library: {exc}"
    if isa < 1:
        return False, ("this CPU has neither AVX2 + FMA nor AVX-512 (cellsam-rt's attention "
                       "kernel would be slower than ONNX Runtime's plain graphs)")
    return True, f"{path.name} ({ISA_NAMES[min(isa, 2)]})"


def missing(ops: "list[str] | tuple[str, ...]") -> list[str]:
    """Ops among `ops` that this library does not provide."""
    return [op for op in ops if op not in PROVIDED]


def register(options) -> None:
    """Make PROVIDED ops available to sessions created with these onnxruntime SessionOptions."""
    path = library_path()
    if path is None:
        raise RuntimeError(status()[1])
    options.register_custom_ops_library(str(path))
