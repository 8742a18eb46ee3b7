// The CUDA kernels of the cbam_fused ops (TORCH_LIBRARY_IMPL(cbam_fused, CUDA)).
// Built only in a CUDA build (setup.py); the launchers live in csrc/launchers.
#include <torch/library.h>

#include "launchers/register_ops.h"

TORCH_LIBRARY_IMPL(cbam_fused, CUDA, m) { cbam::impl_ops(m); }

// Test knobs of the CUDA build (csrc/launchers/launchers.h, cbam::debug): poison outputs with NaN,
// choose the tiling. torch.ops.cbam_fused_debug.set_debug(poison, tile_mode); set_tuning(tiles per
// SM, min rows per thread, vector rows in flight, reduce_k mode, reduce_k vectors in
// flight) sets the tuning knobs and returns the previous values.
TORCH_LIBRARY(cbam_fused_debug, m) {
  m.def("set_debug(bool poison_outputs, int tile_mode) -> ()", &cbam::set_debug);
  m.def("set_tuning(int tiles_per_sm, int min_rows_per_thread, int vec_rows_in_flight=0, "
        "int reduce_k_mode=2, int k_vectors_in_flight=4) -> int[]",
        &cbam::set_tuning);
}
