// Launchers of the forward pools, pool_over_s and pool_over_c (launchers/pool.h): mean, max
// and argmax of x * scale over S or over C, one reduction each (launchers/reduction.h).
#include "launchers/pool.h"

namespace cbam {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_over_s(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& scale) {
  const auto o = pool<false>("pool_over_s", x, scale, true);
  return {o[0], o[1], o[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_over_c(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& scale) {
  const auto o = pool<false>("pool_over_c", x, scale, false);
  return {o[0], o[1], o[2]};
}

}  // namespace cbam
