// Python module entry point for selattn_ext._C. Importing it runs the static TORCH_LIBRARY
// registrations in ops.cpp; the ops are then reached as torch.ops.selattn.*. No pybind11: the
// module itself exports nothing.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
