// The CUDA kernels' launchers built for the SIMT simulator: the very same launcher and kernel
// sources as the CUDA build (csrc/launchers/*.cu, csrc/kernels/*.cuh), compiled here by g++ with
// -DCBAM_SIMULATOR, registered as torch.ops.cbam_fused_sim.* (the schemas of csrc/ops.cpp) for CPU
// tensors. cbam_fused.testing.use_simulator() routes the cbam_fused ops' CPU kernels here.
#include <torch/library.h>

#include "launchers/apply_gates.cu"
#include "launchers/backward_reduce.cu"
#include "launchers/batch_norm_gate.cu"
#include "launchers/channel_head.cu"
#include "launchers/channel_head_backward.cu"
#include "launchers/grad_input.cu"
#include "launchers/pool.cu"
#include "launchers/pool_backward_scale.cu"
#include "launchers/pool_backward_scale_lp_lse.cu"
#include "launchers/pool_lp_lse.cu"
#include "launchers/pool_lp_lse_unscaled.cu"
#include "launchers/pool_unscaled.cu"
#include "launchers/spatial_head.cu"
#include "launchers/spatial_head_backward.cu"
#include "launchers/register_ops.h"
#include "op_schemas.h"

TORCH_LIBRARY(cbam_fused_sim, m) {
  cbam::define_ops(m);
  // Test knobs of the launchers (csrc/launchers/launchers.h, cbam::debug).
  m.def(cbam::kSetDebugSchema, &cbam::set_debug);
  m.def(cbam::kSetTuningSchema, &cbam::set_tuning);
  m.def(cbam::kGroupCountersSchema, &cbam::group_counter_buffers);
  m.def(cbam::kSetPassOrderSchema, &cbam::set_pass_order);
  m.def(cbam::kSetPdlSchema, &cbam::set_pdl);
}

TORCH_LIBRARY_IMPL(cbam_fused_sim, CPU, m) { cbam::impl_ops(m); }
