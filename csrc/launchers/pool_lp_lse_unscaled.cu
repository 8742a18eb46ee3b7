// pool_over_s_lp_lse(x) without a scale (launchers/pool.h, pool), through the policy without
// weights.
#include "launchers/pool.h"

namespace cbam {

std::vector<at::Tensor> pool_lp_lse_unscaled(const char* op, const at::Tensor& x) {
  return pool_of<true, false>(op, x, std::nullopt, true);
}

}  // namespace cbam
