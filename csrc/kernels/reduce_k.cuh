// Reduction over the contiguous axis k of x [N, R, K] (channels-first pool over S, channels-last
// pool over C, and the matching scale gradients).
//
//   out[n, r] = fold over k of Policy::add(x[n, r, k], w[n, k])       (pool_policies.cuh)
//
// Pass: reads x once. Tiles as in common.cuh, with up to kReduceKVectors vectors per lane and row
// (cols_per_tile = TX * VEC * that). The weights of the tile's columns are read from global
// memory once per tile into shared memory, lane-fastest (see below); a policy's value of the row
// (kHasKept) once per row and tile. Each thread folds its vectors of a row, then the TX lanes of the row combine
// by xor shuffles (fixed tree), and lane 0 writes the result of the row: the final value when
// the row fits one column tile (nkt == 1), else the partial [n, kt, r]; combine_partials (second
// stage) then folds the nkt partials of each row in order. Requires VEC == 1 or K % VEC == 0.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

constexpr int kReduceKVectors = 4;  // vectors per lane and row of one reduce_k tile, at most

template <typename T, int VEC, typename Policy>
CBAM_GLOBAL void reduce_k_kernel(const T* __restrict__ x, Policy pol, Geom g) {
  using acc_t = typename Policy::acc_t;
  using State = typename Policy::State;
  // The weights of the tile's columns, lane-fastest: column (j * TX + lane) * VEC + v (element v
  // of the lane's vector j) sits at s_w[(j * VEC + v) * TX + lane], so the TX lanes of a row read
  // TX adjacent entries each time, free of bank conflicts. (In column order the lanes would read
  // entries VEC apart: up to 32-way conflicts for 16-bit x and 16-byte weights, read once per
  // element and row.) Written once per tile, read once per element.
  __shared__ typename Policy::Weight s_w[32 * VEC * kReduceKVectors];
  const TileId t = tile_id(g, VEC);
  const int TX = blockDim.x, TY = blockDim.y;
  {
    const int tid = threadIdx.y * TX + threadIdx.x;
    const int ncols = static_cast<int>(t.k_end - t.k_begin);
    for (int c = tid; c < ncols; c += TX * TY) {
      const int lane_vec = c / VEC;  // j * TX + lane
      const int slot = ((lane_vec / TX) * VEC + c % VEC) * TX + lane_vec % TX;
      s_w[slot] = pol.weight(t.n, t.k_begin + c);
    }
    __syncthreads();
  }

  for (int64_t rb = t.r_begin; rb < t.r_end; rb += TY) {  // the same trip count in every thread
    const int64_t r = rb + threadIdx.y;
    State s = pol.init();
    if constexpr (Policy::kHasKept) {  // one load per row: lane 0 of the row, then a shuffle
      const int lane = static_cast<int>((threadIdx.y * TX + threadIdx.x) % 32);
      const acc_t kv = threadIdx.x == 0 && r < t.r_end ? pol.kept(t.n, r) : acc_t(1);
      pol.set_kept(s, __shfl_sync(0xffffffffu, kv, lane - static_cast<int>(threadIdx.x)));
    }
    if (r < t.r_end) {
      const T* row = x + (t.n * g.R + r) * g.K;
      int slot = threadIdx.x;  // (j * VEC) * TX + lane for the lane's vector j
      for (int64_t k = t.k0; k < t.k_end; k += TX * VEC, slot += VEC * TX) {
        acc_t xv[VEC];
        load_acc<VEC>(row + k, xv);
        for (int v = 0; v < VEC; ++v) {
          pol.add(s, xv[v], s_w[slot + v * TX], static_cast<int>(k + v), r);
        }
      }
    }
    for (int lane_mask = TX / 2; lane_mask > 0; lane_mask /= 2) {
      pol.combine(s, pol.shfl_xor(s, lane_mask));
    }
    if (threadIdx.x == 0 && r < t.r_end) {
      if (g.nkt == 1) {
        pol.store_final(t.n * g.R + r, s);
      } else {
        pol.store_partial((t.n * g.nkt + t.kt) * g.R + r, s);
      }
    }
  }
}

}  // namespace cbam
