// The launchers as the kernels of the cbam_fused ops: one list for the CUDA build
// (csrc/register_cuda.cpp) and the simulator build (csrc/sim/kernels_sim.cpp).
#pragma once
#include <torch/library.h>

#include "launchers.h"

namespace cbam {

inline void impl_ops(torch::Library& m) {
  m.impl("pool_over_s", &pool_over_s);
  m.impl("pool_over_s_lp_lse", &pool_over_s_lp_lse);
  m.impl("pool_over_c", &pool_over_c);
  m.impl("apply_gates", &apply_gates);
  m.impl("channel_head", &channel_head);
  m.impl("channel_head_backward", &channel_head_backward);
  m.impl("spatial_head", &spatial_head);
  m.impl("spatial_head_backward", &spatial_head_backward);
  m.impl("batch_norm_gate", &batch_norm_gate);
  m.impl("batch_norm_gate_backward", &batch_norm_gate_backward);
  m.impl("backward_reduce", &backward_reduce);
  m.impl("pool_over_c_backward_scale", &pool_over_c_backward_scale);
  m.impl("pool_over_s_backward_scale", &pool_over_s_backward_scale);
  m.impl("pool_over_s_backward_scale_lp_lse", &pool_over_s_backward_scale_lp_lse);
  m.impl("grad_input", &grad_input);
  m.impl("grad_input_lp_lse", &grad_input_lp_lse);
}

}  // namespace cbam
