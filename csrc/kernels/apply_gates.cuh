// The apply: y[n,c,s] = x[n,c,s] * gc[n,c] * gs[n,s] (in this order, in acc_t; a missing gate
// is 1).
// Pass: reads x once, writes y once. x and y viewed as [N, R, K] (common.cuh); the gate along k
// is staged once per tile (stage_k_side) and held in registers per thread (VEC columns), the gate
// along r is staged in shared memory per chunk of rows, so the small gates are read once per
// tile. `cl` says whether k is the channel axis (channels-last). Requires VEC == 1 or
// K % VEC == 0.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

template <typename T, int VEC, int U, typename acc_t>
CBAM_GLOBAL void apply_gates_kernel(const T* __restrict__ x, T* __restrict__ y, const acc_t* gr,
                                    const acc_t* gk, Geom g, bool cl) {
  __shared__ acc_t s_gr[kChunkRows];
  const TileId t = tile_id(g, VEC);
  const bool active = t.k0 < g.K;
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = threadIdx.y * TX + threadIdx.x;

  __shared__ acc_t s_gk[32 * VEC];
  acc_t wk[VEC];
  stage_k_side<VEC>(
      s_gk, t, [&](int64_t k) { return gk != nullptr ? ld(gk + t.n * g.K + k) : acc_t(1); },
      wk);
  for (int64_t cb = t.r_begin; cb < t.r_end; cb += kChunkRows) {
    const int64_t rest = t.r_end - cb;
    const int clen = rest < kChunkRows ? static_cast<int>(rest) : kChunkRows;
    __syncthreads();
    for (int i = tid; i < clen; i += TX * TY) {
      s_gr[i] = gr != nullptr ? ld(gr + t.n * g.R + cb + i) : acc_t(1);
    }
    __syncthreads();
    if (!active) continue;
    for (int i0 = threadIdx.y; i0 < clen; i0 += U * TY) {
      acc_t v_[U][VEC] = {};
      for (int u = 0; u < U; ++u) {  // loads first: U rows in flight
        const int i = i0 + u * TY;
        if (i < clen) load_acc<VEC>(x + (t.n * g.R + cb + i) * g.K + t.k0, v_[u]);
      }
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * TY;
        if (i >= clen) break;
        const acc_t wr = s_gr[i];
        for (int v = 0; v < VEC; ++v) {
          v_[u][v] = cl ? v_[u][v] * wk[v] * wr : v_[u][v] * wr * wk[v];
        }
        store_from_acc<VEC>(y + (t.n * g.R + cb + i) * g.K + t.k0, v_[u]);
      }
    }
  }
}

}  // namespace cbam
