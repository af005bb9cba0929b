// An empty Python module init, so that tools which import every module of the package (API
// docs, test collectors, pkgutil.walk_packages) can import this library too. Python code never
// calls into it: ONNX Runtime loads it (cellsam_rt.ops.register).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "cellsam-rt's ONNX Runtime kernel library (loaded by onnxruntime, not used from Python)",
    -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
