// Launchers of the pools' scale gradients (Q2), pool_over_s_backward_scale and
// pool_over_c_backward_scale (launchers/pool.h): one reduction each (launchers/reduction.h).
#include "launchers/pool.h"

namespace cbam {

at::Tensor pool_over_s_backward_scale(const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
                                      const std::optional<at::Tensor>& d_max,
                                      const std::optional<at::Tensor>& argmax,
                                      const std::optional<at::Tensor>& base,
                                      const std::optional<at::Tensor>& gate) {
  return pool_backward_scale<false>("pool_over_s_backward_scale", x, d_avg, d_max, argmax,
                                    base, gate, true);
}

at::Tensor pool_over_c_backward_scale(const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
                                      const std::optional<at::Tensor>& d_max,
                                      const std::optional<at::Tensor>& argmax,
                                      const std::optional<at::Tensor>& base,
                                      const std::optional<at::Tensor>& gate) {
  return pool_backward_scale<false>("pool_over_c_backward_scale", x, d_avg, d_max, argmax,
                                    base, gate, false);
}

}  // namespace cbam
