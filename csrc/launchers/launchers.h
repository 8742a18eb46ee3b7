// Host launchers of the CBAM kernels: shape checks, dtype dispatch, grid sizing, output allocation.
// Written once, compiled by nvcc into cbam_fused._C and by g++ (-DCBAM_SIMULATOR) into
// cbam_fused._sim. Each function has the signature of its op in csrc/ops.cpp.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace cbam {

// Test knobs, off by default; set from Python through the debug op of each build
// (torch.ops.cbam_fused_sim.set_debug / torch.ops.cbam_fused_debug.set_debug).
namespace debug {
// Fill every output with NaN (int64 outputs: INT64_MIN) right after allocating it, so an element
// a kernel never writes shows up in a test.
inline bool poison_outputs = false;
// Tiling: 0 = the normal heuristics; 1 = tiny tiles (at most 2 lanes along the contiguous axis,
// 3 rows per tile: every reduction splits into many partials, on small shapes); 2 = one row tile
// spanning all rows (the single-stage path of the strided reductions, chunked staging).
inline int tile_mode = 0;
}  // namespace debug

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_over_s(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_over_c(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& scale);
at::Tensor apply_gates(const at::Tensor& x, const std::optional<at::Tensor>& gc,
                       const std::optional<at::Tensor>& gs);
std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad, const at::Tensor& x,
                                                   const std::optional<at::Tensor>& gc,
                                                   const std::optional<at::Tensor>& gs,
                                                   bool need_rc, bool need_rs);
at::Tensor pool_over_c_backward_scale(const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
                                      const std::optional<at::Tensor>& d_max,
                                      const std::optional<at::Tensor>& argmax);
at::Tensor pool_over_s_backward_scale(const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
                                      const std::optional<at::Tensor>& d_max,
                                      const std::optional<at::Tensor>& argmax);
at::Tensor grad_input(const at::Tensor& grad, const std::optional<at::Tensor>& gc,
                      const std::optional<at::Tensor>& gs, const std::optional<at::Tensor>& da,
                      const std::optional<at::Tensor>& dm, const std::optional<at::Tensor>& idx_s,
                      const std::optional<at::Tensor>& du, const std::optional<at::Tensor>& dv,
                      const std::optional<at::Tensor>& idx_c, int64_t arrangement);

// Sets the debug knobs above (the body of the debug ops).
inline void set_debug(bool poison_outputs, int64_t tile_mode) {
  debug::poison_outputs = poison_outputs;
  debug::tile_mode = static_cast<int>(tile_mode);
}

}  // namespace cbam
