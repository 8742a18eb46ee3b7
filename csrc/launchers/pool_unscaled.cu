// The forward pools of x itself, without a scale (launchers/pool.h, pool): pool_over_s(x) and
// pool_over_c(x), the first pool of every arrangement, through the policy without weights.
#include "launchers/pool.h"

namespace cbam {

std::vector<at::Tensor> pool_unscaled(const char* op, const at::Tensor& x, bool over_s) {
  return pool_of<false, false>(op, x, std::nullopt, over_s);
}

}  // namespace cbam
