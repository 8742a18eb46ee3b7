// The CUDA kernels of the cbam_fused ops (TORCH_LIBRARY_IMPL(cbam_fused, CUDA)).
// Built only in a CUDA build (setup.py); the launchers live in csrc/launchers.
#include <torch/library.h>

#include "launchers/launchers.h"

TORCH_LIBRARY_IMPL(cbam_fused, CUDA, m) {
  // Filled in by the kernel work (issue 4): m.impl("pool_over_s", &cbam::pool_over_s); ...
}
