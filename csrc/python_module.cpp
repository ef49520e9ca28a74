// The CPython face of the extension: an empty module whose import loads this shared
// library, so that the TORCH_LIBRARY blocks in the other translation units register
// mlifast's operators with the dispatcher. Nothing else crosses this boundary.
#include <Python.h>

static PyModuleDef mlifast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "mlifast compiled operators (registered under torch.ops.mlifast)", -1,
    nullptr, nullptr, nullptr, nullptr, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&mlifast_c_module);
  if (module == nullptr) return nullptr;
#ifdef MLIFAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
