// The CUDA kernels of the cbam_fused ops (TORCH_LIBRARY_IMPL(cbam_fused, CUDA)).
// Built only in a CUDA build (setup.py); the launchers live in csrc/launchers.
#include <torch/library.h>

#include "launchers/launchers.h"

TORCH_LIBRARY_IMPL(cbam_fused, CUDA, m) {
  m.impl("pool_over_s", &cbam::pool_over_s);
  m.impl("pool_over_c", &cbam::pool_over_c);
  m.impl("apply_gates", &cbam::apply_gates);
  m.impl("backward_reduce", &cbam::backward_reduce);
  m.impl("pool_over_c_backward_scale", &cbam::pool_over_c_backward_scale);
  m.impl("pool_over_s_backward_scale", &cbam::pool_over_s_backward_scale);
  m.impl("grad_input", &cbam::grad_input);
}

// Test knobs of the CUDA build (csrc/launchers/launchers.h, cbam::debug): poison outputs with NaN,
// choose the tiling. torch.ops.cbam_fused_debug.set_debug(poison, tile_mode).
TORCH_LIBRARY(cbam_fused_debug, m) {
  m.def("set_debug(bool poison_outputs, int tile_mode) -> ()", &cbam::set_debug);
}
