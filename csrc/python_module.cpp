// The Python extension module subspace_ext._C. Importing it loads the library, which registers
// the ops (torch.ops.subspace_ext.*); the module itself only reports how it was built.
#include <Python.h>

namespace {

PyObject* cuda_enabled(PyObject*, PyObject*) {
#ifdef SUBSPACE_EXT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cuda_enabled", cuda_enabled, METH_NOARGS, "True if the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "subspace_ext native kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
