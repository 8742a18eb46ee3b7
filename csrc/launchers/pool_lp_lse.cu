// Launcher of pool_over_s_lp_lse (launchers/pool.h): the pool over S with the official code's
// lp and lse pools too, in the same pass (launchers/reduction.h).
#include "launchers/pool.h"

namespace cbam {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_over_s_lp_lse(
    const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  const auto o = pool<true>("pool_over_s_lp_lse", x, scale, true);
  return {o[0], o[1], o[2], o[3], o[4]};
}

}  // namespace cbam
