// The one place where the schemas of solo_fast's compiled ops are declared
// (torch.ops.solo_fast.*). CPU implementations register in csrc/cpu/, CUDA ones in
// csrc/cuda/, each with TORCH_LIBRARY_IMPL under these same names.
#include <Python.h>
#include <torch/library.h>

// A Python module named _C so `import solo_fast._C` loads this library and runs the
// static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "solo_fast compiled ops", -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(solo_fast, m) {
}
