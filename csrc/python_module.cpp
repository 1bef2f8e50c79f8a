// The Python extension module subspace_ext._C. Importing it loads the library, which registers
// the ops (torch.ops.subspace_ext.*); the module itself only reports how it was built.
#include <Python.h>

// The torch this build is against: setup.py writes the header (build/generated/torch-<version>/); a build without it
// reports "unknown".
#if __has_include("subspace_ext_torch_build.h")
#include "subspace_ext_torch_build.h"
#endif
#ifndef SUBSPACE_EXT_TORCH_VERSION
#define SUBSPACE_EXT_TORCH_VERSION "unknown"
#endif

// The same, as bytes in the file: subspace_ext/ops.py reads them when the library does not load (a
// torch it was not built against leaves symbols undefined), to say which torch it needs.
extern "C" __attribute__((used, visibility("default"))) const char subspace_ext_torch_build[] =
    "subspace_ext: built against torch " SUBSPACE_EXT_TORCH_VERSION;

namespace {

PyObject* cuda_enabled(PyObject*, PyObject*) {
#ifdef SUBSPACE_EXT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* torch_version(PyObject*, PyObject*) { return PyUnicode_FromString(SUBSPACE_EXT_TORCH_VERSION); }

PyMethodDef methods[] = {
    {"cuda_enabled", cuda_enabled, METH_NOARGS, "True if the CUDA kernels were compiled in."},
    {"torch_version", torch_version, METH_NOARGS, "The torch version this library was built against."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "subspace_ext native kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
