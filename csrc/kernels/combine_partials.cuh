// Second stage of the two-stage reductions: out[n, l] = fold over p = 0 .. P-1 (in order) of the
// partials [n, p, l] that the first stage wrote. Reads the partials once (P / rows-per-tile of a
// pass), writes the outputs once. One thread per (n, l), grid-stride over N * L.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

template <typename Policy>
CBAM_GLOBAL void combine_partials_kernel(Policy pol, int64_t N, int64_t P, int64_t L) {
  const int64_t total = N * L;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t n = e / L, l = e % L;
    typename Policy::State s = pol.init();
    for (int64_t p = 0; p < P; ++p) pol.combine(s, pol.load_partial((n * P + p) * L + l));
    pol.store_final(e, s);
  }
}

}  // namespace cbam
