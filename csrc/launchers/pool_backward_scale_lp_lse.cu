// Launcher of pool_over_s_backward_scale_lp_lse (launchers/pool.h): the scale gradient of the
// pool over S with the lp and lse pools' terms, one reduction (launchers/reduction.h).
#include "launchers/pool.h"

namespace cbam {

at::Tensor pool_over_s_backward_scale_lp_lse(
    const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
    const std::optional<at::Tensor>& d_max, const std::optional<at::Tensor>& argmax,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& d_lp,
    const std::optional<at::Tensor>& lp, const std::optional<at::Tensor>& d_lse,
    const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& base,
    const std::optional<at::Tensor>& gate) {
  const LpLseScaleGrads ext{scale, d_lp, lp, d_lse, lse};
  return pool_backward_scale<true>("pool_over_s_backward_scale_lp_lse", x, d_avg, d_max,
                                   argmax, base, gate, true, &ext);
}

}  // namespace cbam
