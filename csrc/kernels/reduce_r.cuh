// Reduction over the strided axis r of x [N, R, K] (channels-first pool over C, channels-last
// pool over S, and the matching scale gradients).
//
//   out[n, k] = fold over r of Policy::add(x[n, r, k], w[n, r])       (pool_policies.cuh)
//
// Pass: reads x once. Tiles as in common.cuh; the row tiles are the first stage of the
// reduction (nrt splits of R). Threads along k keep one State per column (with the policy's
// value of the column, kHasKept, staged once per tile); the weights of the tile's rows are
// staged in shared memory kChunkRows at a time. The TY threads of a column then combine through
// shared memory in a fixed tree (any TY: the launcher may give each vector of a short row its
// own thread, TX = K / VEC up to kMaxSpanCols, TY = 256 / TX, so that a block's rows are read as
// one contiguous span, launchers/common.h make_geom). Thread row 0 writes the final value
// (nrt == 1) or the partial [n, rt, k], which combine_partials folds in order. Requires
// VEC == 1 or K % VEC == 0.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

template <typename T, int VEC, int U, typename Policy>
CBAM_GLOBAL void reduce_r_kernel(const T* __restrict__ x, Policy pol, Geom g) {
  using acc_t = typename Policy::acc_t;
  using State = typename Policy::State;
  __shared__ typename Policy::Weight s_w[kChunkRows];
  __shared__ State s_state[kBlockThreads * VEC];

  const TileId t = tile_id(g, VEC);
  const bool active = t.k0 < g.K;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = ty * TX + tx;

  State s[VEC];
  for (int v = 0; v < VEC; ++v) s[v] = pol.init();
  if constexpr (Policy::kHasKept) {  // the policy's values of the tile's columns, loaded once
    __shared__ acc_t s_kept[kMaxSpanCols * VEC];
    acc_t kv[VEC];
    stage_k_side<VEC>(s_kept, t, [&](int64_t k) { return pol.kept(t.n, k); }, kv);
    for (int v = 0; v < VEC; ++v) pol.set_kept(s[v], kv[v]);
  }

  for (int64_t cb = t.r_begin; cb < t.r_end; cb += kChunkRows) {
    const int64_t rest = t.r_end - cb;
    const int clen = rest < kChunkRows ? static_cast<int>(rest) : kChunkRows;
    __syncthreads();  // the previous chunk's weights are no longer read
    for (int i = tid; i < clen; i += TX * TY) s_w[i] = pol.weight(t.n, cb + i);
    __syncthreads();
    if (active) {
      for (int i0 = ty; i0 < clen; i0 += U * TY) {
        acc_t xv[U][VEC] = {};
        CBAM_UNROLL
        for (int u = 0; u < U; ++u) {  // loads first: U rows in flight
          const int i = i0 + u * TY;
          if (i < clen) load_acc<VEC>(x + (t.n * g.R + cb + i) * g.K + t.k0, xv[u]);
        }
        CBAM_UNROLL
        for (int u = 0; u < U; ++u) {  // rows in increasing order
          const int i = i0 + u * TY;
          if (i >= clen) continue;  // (not break: the loop unrolls, xv stays in registers)
          const int64_t r = cb + i;
          const typename Policy::Weight w = s_w[i];
          for (int v = 0; v < VEC; ++v) pol.add(s[v], xv[u][v], w, static_cast<int>(r), t.k0 + v);
        }
      }
    }
  }

  for (int v = 0; v < VEC; ++v) s_state[tid * VEC + v] = s[v];
  __syncthreads();
  // n states of a column left: the first n - h take in those h above them (h = ceil(n / 2); for
  // a power of two, the halving tree)
  for (int n = TY; n > 1;) {
    const int h = (n + 1) / 2;
    if (ty < n - h) {
      for (int v = 0; v < VEC; ++v) {
        pol.combine(s_state[tid * VEC + v], s_state[(tid + h * TX) * VEC + v]);
      }
    }
    __syncthreads();
    n = h;
  }
  if (ty == 0 && active) {
    for (int v = 0; v < VEC; ++v) {
      const int64_t k = t.k0 + v;
      if (g.nrt == 1) {
        pol.store_final(t.n * g.K + k, s_state[tid * VEC + v]);
      } else {
        pol.store_partial((t.n * g.nrt + t.rt) * g.K + k, s_state[tid * VEC + v]);
      }
    }
  }
}

}  // namespace cbam
