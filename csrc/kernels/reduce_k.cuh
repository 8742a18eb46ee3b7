// Reduction over the contiguous axis k of x [N, R, K] (channels-first pool over S, channels-last
// pool over C, and the matching scale gradients).
//
//   out[n, r] = fold over k of Policy::add(x[n, r, k], w[n, k])       (pool_policies.cuh)
//
// Pass: reads x once. Tiles as in common.cuh. Each thread keeps the weights of its VEC columns in
// registers for the whole tile, loads one vector of x per row, folds it, and the TX lanes of the
// row combine by xor shuffles (fixed tree). Lane 0 writes the result of the row: the final value
// when the row fits one column tile (nkt == 1), else the partial [n, kt, r]; combine_partials
// (second stage) then folds the nkt partials of each row in order. Requires VEC == 1 or
// K % VEC == 0.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

template <typename T, int VEC, typename Policy>
CBAM_GLOBAL void reduce_k_kernel(const T* __restrict__ x, Policy pol, Geom g) {
  using acc_t = typename Policy::acc_t;
  using State = typename Policy::State;
  const TileId t = tile_id(g, VEC);
  const bool active = t.k0 < g.K;
  const int tx = threadIdx.x;
  const int TY = blockDim.y;

  typename Policy::Weight w[VEC];
  for (int v = 0; v < VEC; ++v) w[v] = pol.weight(t.n, active ? t.k0 + v : 0);

  for (int64_t rb = t.r_begin; rb < t.r_end; rb += TY) {  // the same trip count in every thread
    const int64_t r = rb + threadIdx.y;
    State s = pol.init();
    if (active && r < t.r_end) {
      acc_t xv[VEC];
      load_acc<VEC>(x + (t.n * g.R + r) * g.K + t.k0, xv);
      for (int v = 0; v < VEC; ++v) pol.add(s, xv[v], w[v], static_cast<int>(t.k0 + v), r);
    }
    for (int lane_mask = blockDim.x / 2; lane_mask > 0; lane_mask /= 2) {
      pol.combine(s, pol.shfl_xor(s, lane_mask));
    }
    if (tx == 0 && r < t.r_end) {
      if (g.nkt == 1) {
        pol.store_final(t.n * g.R + r, s);
      } else {
        pol.store_partial((t.n * g.nkt + t.kt) * g.R + r, s);
      }
    }
  }
}

}  // namespace cbam
