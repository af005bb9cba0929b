"""Builds cellsam-rt's ONNX Runtime kernel library (runtime/cellsam_rt/kernels); the rest of the
project is configured in pyproject.toml. The library is optional: without a C++ compiler (or
on MSVC) the package installs without it and the CPU backend keeps ONNX Runtime's own ops."""
import sys

from setuptools import Extension, setup

OPS = "runtime/cellsam_rt/kernels"

kernels = Extension(
    "cellsam_rt.kernels._kernels",  # a shared library that ONNX Runtime loads (importable, empty)
    sources=[f"{OPS}/ort_op.cc", f"{OPS}/relpos_attention.cc", f"{OPS}/pymodule.cc"],
    depends=[f"{OPS}/ort_abi.h", f"{OPS}/relpos_attention.h"],
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
    language="c++",
    optional=True,
)

setup(ext_modules=[] if sys.platform == "win32" else [kernels])
