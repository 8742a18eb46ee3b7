// The CUDA kernels of the cbam_fused ops (TORCH_LIBRARY_IMPL(cbam_fused, CUDA)).
// Built only in a CUDA build (setup.py); the launchers live in csrc/launchers.
#include <torch/library.h>

#include "launchers/register_ops.h"

TORCH_LIBRARY_IMPL(cbam_fused, CUDA, m) { cbam::impl_ops(m); }

// Test knobs of the CUDA build (csrc/launchers/launchers.h, cbam::debug): poison outputs with NaN,
// choose the tiling. torch.ops.cbam_fused_debug.set_debug(poison, tile_mode); set_tuning(tiles per
// SM, min rows per thread, vector rows in flight, reduce_k mode, reduce_k vectors in
// flight, reduce_r mode, side share, reduce_k vectors a lane per tile) sets the tuning knobs and
// returns the previous values; group_counters() returns the kept counter buffers of the split
// reductions (launchers/common.h group_counters), all zero between launches.
TORCH_LIBRARY(cbam_fused_debug, m) {
  m.def(cbam::kSetDebugSchema, &cbam::set_debug);
  m.def(cbam::kSetTuningSchema, &cbam::set_tuning);
  m.def(cbam::kGroupCountersSchema, &cbam::group_counter_buffers);
  m.def(cbam::kSetPassOrderSchema, &cbam::set_pass_order);
  m.def(cbam::kSetPdlSchema, &cbam::set_pdl);
}
