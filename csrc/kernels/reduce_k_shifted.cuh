// Reduction over the contiguous axis k of x [N, R, K] for rows that are not whole 16-byte vectors
// (K % VEC != 0) and too long to stage whole (reduce_k_rows): a channels-first 23x23, 35x35 or
// 65x65 map, any map of more than 512 elements that is not a multiple of a vector (16-bit 8 j + 4
// too).
//
//   out[n, r] = fold over k of Policy::add(x[n, r, k], w[n, k])       (pool_policies.cuh)
//
// Pass: reads x once. Row r of sample n starts at element e = (n R + r) K, h = (-e) mod VEC
// elements before its first 16-byte boundary (x's base is 16-byte aligned): its head, k < h;
// then its body of nb = (K - h) / VEC whole vectors, k = h + b VEC + v; then its tail, the
// K - h - nb VEC < VEC elements after them. Tiles as in reduce_k.cuh (make_geom, kv_max
// kReduceKVectors: kv = cols_per_tile / (TX VEC) vectors a lane), over the body: column tile kt
// holds body vectors kt TX kv .. (kt + 1) TX kv - 1 of each of its rows (fewer at the end of the
// body); tile 0 also the head, the last tile also the tail. Each lane folds, in increasing k,
// its head elements (k = lane, lane + TX, ...), its body vectors b = kt TX kv + j TX + lane (the
// loads of all of them issued first: up to kReduceKVectors 16-byte loads in flight), its tail
// elements; then the TX lanes of the row combine by xor shuffles (fixed tree; the max's ties go
// to the lower index) and lane 0 writes the row's final value (nkt == 1) or its partial
// [n, kt, r] for the row tile's last block (finish_group, combine_partials.cuh). The weights of
// the columns a tile may touch, [k_begin - VEC + 1, k_end + VEC - 1) (h differs from row to
// row, and the last tile's tail may start before k_begin), are staged once per tile in column
// order with one empty slot after every VEC (padded_slot): the lanes, VEC columns apart, read
// distinct banks whatever the row's h. Where reduce_k would load such a row one element (2 or 4
// bytes) at a time, every element but at most 2 (VEC - 1) a row moves in 16-byte loads.
#pragma once

#include "kernels/reduce_k.cuh"

namespace cbam {

// Staged weights of one tile: cols_per_tile (at most 32 VEC kReduceKVectors) + 2 (VEC - 1)
// columns, padded.
template <int VEC>
constexpr int kShiftedSlots = (32 * VEC * kReduceKVectors + 2 * VEC) * (VEC + 1) / VEC;

template <typename T, int VEC, typename Policy>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads, sizeof(T) == 8 ? 3 : 4)
    reduce_k_shifted_kernel(const T* __restrict__ x, Policy pol, Geom g) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  static_assert(VEC > 1, "rows shifted against 16-byte vectors of VEC > 1 elements");
  constexpr int KV = kReduceKVectors;
  using acc_t = typename Policy::acc_t;
  using State = typename Policy::State;
  __shared__ typename Policy::Weight s_w[stages_weights<Policy>() ? kShiftedSlots<VEC> : 1];
  const TileId t = tile_id(g, VEC);
  const int TX = blockDim.x, TY = blockDim.y, lane = threadIdx.x;
  const int K = static_cast<int>(g.K);  // K < 2^31 (launcher check)
  // the weights of columns [kb, ke), staged once
  const int kb = t.k_begin >= VEC - 1 ? static_cast<int>(t.k_begin) - (VEC - 1) : 0;
  const int ke = t.k_end + VEC - 1 < K ? static_cast<int>(t.k_end) + VEC - 1 : K;
  if constexpr (stages_weights<Policy>()) {
    for (int c = threadIdx.y * TX + lane; c < ke - kb; c += TX * TY) {
      s_w[padded_slot<VEC>(c)] = pol.weight(t.n, kb + c);
    }
    __syncthreads();
  }
  const bool first = t.kt == 0, last = t.kt == g.nkt - 1;
  const int kv = static_cast<int>(g.cols_per_tile) / (TX * VEC);  // vectors a lane, at most
  const int b0 = static_cast<int>(t.kt) * kv * TX;                 // the tile's first body vector
  for (int64_t rb = t.r_begin; rb < t.r_end; rb += TY) {  // the same trip count in every thread
    const int64_t r = rb + threadIdx.y;
    State s = pol.init();
    set_row_kept(pol, s, t, r);
    if (r < t.r_end) {
      const int64_t e = (t.n * g.R + r) * g.K;  // the row's first element
      const T* row = x + e;
      const int h0 = static_cast<int>((VEC - e % VEC) % VEC);
      const int h = h0 < K ? h0 : K;               // head
      const int nb = (K - h) / VEC;                // body vectors
      const int tail0 = h + nb * VEC;              // the tail's first column
      const auto add = [&](acc_t xv, int k) {
        pol.add(s, xv, staged_weight(s_w, padded_slot<VEC>(k - kb)), k, r);
      };
      if (first) {
        for (int k = lane; k < h; k += TX) add(static_cast<acc_t>(ld(row + k)), k);
      }
      // body vectors b0 + j TX + lane, j < kv, below nb: loads first, then the fold in order
      const int left = b0 + lane < nb ? (nb - 1 - b0 - lane) / TX + 1 : 0;
      const int nv = left < kv ? left : kv;  // <= KV
      Vec<T, VEC> raw[KV] = {};  // (entries j >= nv are never folded)
      const T* p = row + h + static_cast<int64_t>(b0 + lane) * VEC;
      CBAM_UNROLL
      for (int j = 0; j < KV; ++j) {
        if (j < nv) raw[j] = load_raw<VEC>(p + j * TX * VEC);
      }
      int k = h + (b0 + lane) * VEC;
      CBAM_NO_UNROLL
      for (int j = 0; j < nv; ++j, k += TX * VEC) {
        acc_t xv[VEC];
        to_acc<VEC>(raw[0], xv);
        for (int v = 0; v < VEC; ++v) add(xv[v], k + v);
        CBAM_UNROLL
        for (int q = 0; q + 1 < KV; ++q) raw[q] = raw[q + 1];
      }
      if (last) {
        for (int kk = tail0 + lane; kk < K; kk += TX) add(static_cast<acc_t>(ld(row + kk)), kk);
      }
    }
    for (int lane_mask = TX / 2; lane_mask > 0; lane_mask /= 2) {
      pol.combine(s, pol.shfl_xor(s, lane_mask));
    }
    store_row(pol, s, t, g, r);
  }
  finish_group<true>(pol, g, g.R);  // (a row's nkt partials, as reduce_k)
}

}  // namespace cbam
