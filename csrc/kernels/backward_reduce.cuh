// Q1 of the backward: both gate gradients in ONE pass over g and x, x viewed as [N, R, K]:
//
//   out_r[n, r] = sum_k g[n,r,k] x[n,r,k] gk[n,k]     out_k[n, k] = sum_r g[n,r,k] x[n,r,k] gr[n,r]
//
// (channels-first: gr = gc, gk = gs, out_r = rc, out_k = rs; channels-last the other way round;
// a missing gate is 1). Pass: reads g and x once each. Tiles as in common.cuh: gk of the tile's
// columns is staged once (stage_k_side) and each thread keeps that of its VEC columns in
// registers, with the column sums of its columns; gr of the tile's rows is staged in shared
// memory. Per row, the TX lanes combine the row sum by xor shuffles and lane 0
// writes the partial part_r[n, kt, r]; after the rows, the TY column sums of each column combine
// in a fixed shared-memory tree and row 0 writes part_k[n, rt, k]. When nkt (nrt) is 1 the
// partial buffer is the output itself; otherwise sum_partials (SumPolicy + combine_partials)
// adds the partials in order. No atomics. Requires VEC == 1 or K % VEC == 0.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

template <typename T, int VEC, int U, typename acc_t>
CBAM_GLOBAL void backward_reduce_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                        const acc_t* gr, const acc_t* gk, acc_t* part_r,
                                        acc_t* part_k, Geom g, bool need_r, bool need_k) {
  __shared__ acc_t s_gr[kChunkRows];
  __shared__ acc_t s_col[kBlockThreads * VEC];

  const TileId t = tile_id(g, VEC);
  const bool active = t.k0 < g.K;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = ty * TX + tx;

  __shared__ acc_t s_gk[32 * VEC];
  acc_t wk[VEC];
  stage_k_side<VEC>(
      s_gk, t, [&](int64_t k) { return gk != nullptr ? ld(gk + t.n * g.K + k) : acc_t(1); },
      wk);
  acc_t col[VEC];
  for (int v = 0; v < VEC; ++v) col[v] = acc_t(0);

  for (int64_t cb = t.r_begin; cb < t.r_end; cb += kChunkRows) {
    const int64_t rest = t.r_end - cb;
    const int clen = rest < kChunkRows ? static_cast<int>(rest) : kChunkRows;
    __syncthreads();  // the previous chunk's gates are no longer read
    for (int i = tid; i < clen; i += TX * TY) {
      s_gr[i] = gr != nullptr ? ld(gr + t.n * g.R + cb + i) : acc_t(1);
    }
    __syncthreads();
    for (int ib = 0; ib < clen; ib += U * TY) {  // the same trip count in every thread
      acc_t gv[U][VEC] = {}, xv[U][VEC] = {};
      for (int u = 0; u < U; ++u) {  // loads first: U rows in flight
        const int i = ib + u * TY + ty;
        if (active && i < clen) {
          const int64_t off = (t.n * g.R + cb + i) * g.K + t.k0;
          load_acc<VEC>(grad + off, gv[u]);
          load_acc<VEC>(x + off, xv[u]);
        }
      }
      for (int u = 0; u < U; ++u) {
        const int i = ib + u * TY + ty;
        acc_t row = acc_t(0);
        if (active && i < clen) {
          const acc_t wr = s_gr[i];
          for (int v = 0; v < VEC; ++v) {
            const acc_t p = gv[u][v] * xv[u][v];
            row += p * wk[v];
            col[v] += p * wr;
          }
        }
        if (need_r) {  // every lane, every u: the shuffles need the whole warp
          for (int lane_mask = TX / 2; lane_mask > 0; lane_mask /= 2) {
            row += __shfl_xor_sync(0xffffffffu, row, lane_mask);
          }
          if (tx == 0 && i < clen) st(part_r + (t.n * g.nkt + t.kt) * g.R + cb + i, row);
        }
      }
    }
  }

  if (need_k) {
    for (int v = 0; v < VEC; ++v) s_col[tid * VEC + v] = col[v];
    __syncthreads();
    for (int half = TY / 2; half > 0; half /= 2) {
      if (ty < half) {
        for (int v = 0; v < VEC; ++v) s_col[tid * VEC + v] += s_col[(tid + half * TX) * VEC + v];
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
      for (int v = 0; v < VEC; ++v) {
        st(part_k + (t.n * g.nrt + t.rt) * g.K + t.k0 + v, s_col[tid * VEC + v]);
      }
    }
  }
}

// Plain sums for combine_partials (the second stage of backward_reduce).
template <typename acc_t_>
struct SumPolicy {
  using acc_t = acc_t_;
  const acc_t* part;  // [N, P, L]
  acc_t* out;         // [N, L]
  struct State {
    acc_t sum;
  };
  CBAM_DEVICE State init() const {
    State s;
    s.sum = acc_t(0);
    return s;
  }
  CBAM_DEVICE void combine(State& a, const State& b) const { a.sum += b.sum; }
  CBAM_DEVICE State load_partial(int64_t o) const {
    State s;
    s.sum = ld(part + o);
    return s;
  }
  CBAM_DEVICE void store_final(int64_t o, const State& s) const { st(out + o, s.sum); }
};

}  // namespace cbam
