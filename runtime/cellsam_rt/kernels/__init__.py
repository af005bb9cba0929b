"""cellsam-rt's own CPU kernels for ONNX Runtime: a C++ custom-op library built at install.

`com.cellsam.RelPosAttention` is SAM's global attention with decomposed relative positions
(relpos_attention.cc). ONNX Runtime's CPU flash attention takes no additive bias, so without it
the CPU trunks fold rel_h/rel_w into one-hot q/k columns (3x the q.k arithmetic); the kernel adds
them per tile instead (docs/performance.md has the measured gain). Exported CPU trunks list the
ops they need in the manifest (`cpu_custom_ops`); where this library cannot serve them the
backend runs the plain graphs, with a warning.

The onnxruntime wheels ship no C headers, so the library declares the slots of ONNX Runtime's C
API that it calls (ort_abi.h). Before the library is used, `abi_check()` asks the ONNX Runtime of
this process, through its exported `OrtGetApiBase`, whether it serves that API version and
whether the slots that can be exercised without a session behave as declared; a mismatch makes
the library unusable, with the reason, instead of a crash inside a session.

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
    ok, why = abi_check(path)
    if not ok:
        return False, why
    return True, f"{path.name} ({ISA_NAMES[min(isa, 2)]}, {why})"


def _onnxruntime_library() -> Path | None:
    """The ONNX Runtime shared library the Python package loaded (it exports OrtGetApiBase)."""
    import onnxruntime

    capi = Path(onnxruntime.__file__).resolve().parent / "capi"
    found = sorted(capi.glob("libonnxruntime.so*")) + sorted(capi.glob("libonnxruntime*.dylib"))
    return found[0] if found else None


def abi_check(path: Path, api_version: int | None = None) -> tuple[bool, str]:
    """(ok, reason): whether this process's ONNX Runtime matches the library's declared C ABI.

    `api_version` overrides the version asked for (tests use it to provoke a refusal)."""
    import onnxruntime

    ort_lib = _onnxruntime_library()
    if ort_lib is None:
        return True, f"C API not verified: no libonnxruntime beside onnxruntime {onnxruntime.__version__}"
    try:
        kernels = ctypes.CDLL(str(path))
        ort = ctypes.CDLL(str(ort_lib))
    except OSError as exc:
        return False, f"cannot load {path.name} or {ort_lib.name}: {exc}"
    kernels.cellsam_kernels_api_version.restype = ctypes.c_uint32
    ort.OrtGetApiBase.restype = ctypes.c_void_p
    version = kernels.cellsam_kernels_api_version() if api_version is None else api_version
    base = ort.OrtGetApiBase()
    # OrtApiBase is {GetApi, GetVersionString}: the second pointer names the library's version.
    get_version = ctypes.CFUNCTYPE(ctypes.c_char_p)(
        ctypes.cast(base + ctypes.sizeof(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p))[0])
    loaded = get_version().decode()
    if loaded != onnxruntime.__version__:
        return False, (f"{ort_lib} is onnxruntime {loaded}, but the Python package is "
                       f"{onnxruntime.__version__}: two ONNX Runtimes installed?")
    message = ctypes.create_string_buffer(512)
    check = kernels.cellsam_kernels_abi_check
    check.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
    if check(base, version, message, len(message)) != 0:
        return False, f"{path.name}: {message.value.decode()}"
    return True, f"onnxruntime {loaded}, C API {version} checked"


def missing(ops: "list[str] | tuple[str, ...]") -> list[str]:
    """Ops among `ops` that this library does not provide."""
    return [op for op in ops if op not in PROVIDED]


def register(options) -> None:
    """Make PROVIDED ops available to sessions created with these onnxruntime SessionOptions."""
    path = library_path()
    if path is None:
        raise RuntimeError(status()[1])
    options.register_custom_ops_library(str(path))
