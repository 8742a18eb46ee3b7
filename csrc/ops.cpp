// Schemas of the cbam_fused custom ops (torch.library), the heavy x-sized pieces of CBAM.
// Schemas and formulas: csrc/op_schemas.h.
//
// Kernels: CUDA ones in csrc/launchers (registered by csrc/register_cuda.cpp); CPU ones in pure
// PyTorch (cbam_fused/_cpu_kernels.py); fake kernels in cbam_fused/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

// `import cbam_fused._C` loads this library, which registers the ops below (extension-cpp style).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cbam_fused, m) { cbam::define_ops(m); }
