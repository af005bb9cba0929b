"""What GPU software and hardware this machine has, for `cellsam-rt info` and bug reports.

Every probe is optional: a missing package, driver or GPU is reported as such, never raised.
"""
from __future__ import annotations

from importlib import metadata
from typing import Any

def _dist_version(name: str) -> str | None:
    """Installed version of distribution `name`, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _onnxruntime() -> dict[str, Any]:
    info: dict[str, Any] = {
        # Both wheels install the same `onnxruntime` module; having both breaks the GPU one.
        "onnxruntime": _dist_version("onnxruntime"),
        "onnxruntime-gpu": _dist_version("onnxruntime-gpu"),
    }
    try:
        import onnxruntime as ort  # noqa: PLC0415

        info["version"] = ort.__version__
        info["providers"] = list(ort.get_available_providers())
        info["device"] = ort.get_device()
    except Exception as exc:  # noqa: BLE001 - a broken install is worth reporting, not raising
        info["error"] = f"{type(exc).__name__}: {exc}"
    if info["onnxruntime"] and info["onnxruntime-gpu"]:
        info["warning"] = ("both onnxruntime and onnxruntime-gpu are installed; run "
                           "pip uninstall -y onnxruntime onnxruntime-gpu && "
                           "pip install 'cellsam-rt[gpu]'")
    return info


def _tensorrt() -> dict[str, Any]:
    dists = {d: v for d in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-lean",
                            "tensorrt-dispatch") if (v := _dist_version(d))}
    info: dict[str, Any] = {"distributions": dists}
    try:
        import tensorrt as trt  # noqa: PLC0415

        info["version"] = str(trt.__version__)
    except Exception as exc:  # noqa: BLE001 - ImportError, or missing libnvinfer behind it
        info["version"] = None
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def _cuda_python() -> dict[str, Any]:
    info: dict[str, Any] = {"cuda-python": _dist_version("cuda-python"),
                            "cuda-bindings": _dist_version("cuda-bindings")}
    try:
        from cellsam_rt.backends.tensorrt.engines import import_cudart  # noqa: PLC0415

        cudart = import_cudart()
        err, version = cudart.cudaRuntimeGetVersion()
        if int(err) == 0:
            info["cuda_runtime"] = f"{version // 1000}.{(version % 1000) // 10}"
        err, driver = cudart.cudaDriverGetVersion()
        if int(err) == 0 and driver:
            info["cuda_driver_api"] = f"{driver // 1000}.{(driver % 1000) // 10}"
        err, count = cudart.cudaGetDeviceCount()
        info["cuda_devices"] = int(count) if int(err) == 0 else 0
        if int(err) != 0:
            info["cuda_error"] = getattr(err, "name", str(err))
    except Exception as exc:  # noqa: BLE001
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def nvml_gpus() -> list[dict[str, str]] | None:
    """One dict per GPU from NVIDIA's management library (nvidia-ml-py, the [gpu] extra), or
    None when the package, the driver or a GPU is missing."""
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError, or NVMLError without a driver
        return None
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append({"name": _text(pynvml.nvmlDeviceGetName(handle)),
                         "driver_version": driver, "memory.total": f"{total // 2**20} MiB",
                         "compute_cap": f"{major}.{minor}"})
        return gpus
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_software() -> dict[str, Any]:
    """ONNX Runtime, TensorRT, cuda-python and GPU facts of this machine, without raising."""
    gpus = nvml_gpus()
    return {
        "onnxruntime": _onnxruntime(),
        "tensorrt": _tensorrt(),
        "cuda_python": _cuda_python(),
        "gpus": gpus or [],
        "gpu": gpus[0]["name"] if gpus else None,
    }


def format_gpu_software(info: dict[str, Any] | None = None) -> str:
    """`gpu_software()` as the indented lines `cellsam-rt info` prints."""
    info = gpu_software() if info is None else info
    ort, trt, cp = info["onnxruntime"], info["tensorrt"], info["cuda_python"]
    dist = "onnxruntime-gpu" if ort.get("onnxruntime-gpu") else "onnxruntime"
    lines = [f"onnxruntime: {ort.get('version', 'not importable')} ({dist}); providers: "
             f"{', '.join(ort.get('providers', [])) or 'none'}"]
    if "warning" in ort:
        lines.append(f"  warning: {ort['warning']}")
    lines.append(f"tensorrt: {trt.get('version') or 'not installed'}")
    lines.append(f"cuda-python: {cp.get('cuda-python') or cp.get('cuda-bindings') or 'not installed'}"
                 + (f" (CUDA runtime {cp['cuda_runtime']})" if cp.get("cuda_runtime") else ""))
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(f"gpu: {g['name']} (compute {g.get('compute_cap', '?')}, "
                         f"{g.get('memory.total', '?')}, driver {g.get('driver_version', '?')})")
    else:
        lines.append("gpu: none found (no NVIDIA GPU, driver or nvidia-ml-py)")
    return "\n".join(lines)


__all__ = ["format_gpu_software", "gpu_software", "nvml_gpus"]
