// Reduction over the contiguous axis k of x [N, R, K] when the rows are short or of medium
// length, whole rows staged in shared memory: K * sizeof(acc_t) <= kShortRowBytes (a
// channels-first 7x7 map, a channels-last layer of a few dozen channels), one thread per row;
// up to kMedRowMaxK elements (MED: a channels-first 13x13 or 19x19 map, rows of any length, odd
// ones included; fewer for the float64 lp / lse weights, med_row_max_k), TX lanes per row.
//
//   out[n, r] = fold over k of Policy::add(x[n, r, k], w[n, k])       (pool_policies.cuh)
//
// Pass: reads x once. reduce_k.cuh spreads a row over a group of lanes and combines them by
// shuffles: for a row of 49 elements that tree, the row's bookkeeping and its stores cost about
// 130 warp instructions a row (the float32 7x7 pool ran at 20% of the copy bandwidth on an H200,
// bound by instructions, not bytes); and a row that is not whole 16-byte vectors (K % VEC != 0)
// takes it one element a load. Here a block takes blockDim.x / TX consecutive rows of one
// sample, which are one contiguous span of rows * K elements: the threads copy the span into
// shared memory with coalesced loads (16-byte vectors when the launcher found every span
// aligned: VEC > 1; kSpanVectors loads in flight per thread), converted to acc_t, at row pitch
// K | 1 (odd: the threads reading element k of their rows hit distinct banks); the weights
// w[n, 0..K) are staged once. Then the TX lanes of each row (TX = 1 for short rows) fold the
// row's elements k = lane, lane + TX, ... in order, combine by xor shuffles (a fixed tree; the
// max's ties go to the lower index, as everywhere) and lane 0 stores the row's result: no
// partials, no second stage. Grid: N * ceil(R / (blockDim.x / TX)) blocks, 1-D (reverse: the
// blocks' tiles counted from the last, tile_block).
#pragma once

#include "kernels/common.cuh"

namespace cbam {

constexpr int kShortRowBytes = 256;  // K * sizeof(acc_t) at most: K <= 64 (float), 32 (double)
constexpr int kShortRows = 128;      // threads per block (and rows, of short rows)
constexpr int kSpanVectors = 4;      // loads a thread has in flight while copying the span
constexpr int kMedRowMaxK = 512;     // MED: the longest row (its weights are staged too) ...
constexpr int kMedWeightBytes = 12288;  // ... in at most these bytes (static shared memory: 48 KB)

// MED: the longest row of a policy (256 for the float64 lp / lse weights of 48 bytes)
template <typename Policy>
constexpr int med_row_max_k() {
  constexpr int by_bytes = kMedWeightBytes / static_cast<int>(sizeof(typename Policy::Weight));
  return by_bytes < kMedRowMaxK ? by_bytes : kMedRowMaxK;
}

// Elements of acc_t the staged span holds: kShortRows short rows at pitch K | 1 (33 KB).
template <typename acc_t>
constexpr int span_elems() {
  return kShortRows * (kShortRowBytes / static_cast<int>(sizeof(acc_t)) + 1);
}

template <typename T, int VEC, bool MED, typename Policy>
CBAM_GLOBAL void reduce_k_rows_kernel(const T* __restrict__ x, Policy pol, int64_t R, int K,
                                      int TX, int reverse) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  using acc_t = typename Policy::acc_t;
  using State = typename Policy::State;
  constexpr int kMaxK =
      MED ? med_row_max_k<Policy>() : kShortRowBytes / static_cast<int>(sizeof(acc_t));
  __shared__ acc_t s_x[span_elems<acc_t>()];
  __shared__ typename Policy::Weight s_w[stages_weights<Policy>() ? kMaxK : 1];
  const int nt = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int rpb = nt / TX;  // rows a block
  const int64_t chunks = (R + rpb - 1) / rpb;
  const int64_t tb = tile_block(reverse);
  const int64_t n = tb / chunks;
  const int64_t r0 = (tb % chunks) * rpb;
  const int rows = static_cast<int>(R - r0 < rpb ? R - r0 : rpb);
  const int pitch = K | 1;

  if constexpr (stages_weights<Policy>()) {
    for (int k = tid; k < K; k += nt) s_w[k] = pol.weight(n, k);
  }
  // The span's element e = (row, col) goes to s_x[row * pitch + col]; (row, col) of this
  // thread's next element is stepped, not divided out again.
  // Each thread loads kSpanVectors of its vectors before it stores them (the loads in flight: one
  // at a time, the stores to shared memory waited for each, 1.6 MB across an H200 for the float32
  // 7x7 pool, about half of what hides the latency).
  const T* span = x + (n * R + r0) * K;
  const int len = rows * K;
  const int nvec = len / VEC;
  const int step = nt * VEC;
  const int drow = step / K, dcol = step - drow * K;
  int row = (tid * VEC) / K, col = tid * VEC - row * K;
  for (int i0 = tid; i0 < nvec; i0 += kSpanVectors * nt) {
    Vec<T, VEC> raw[kSpanVectors] = {};
    CBAM_UNROLL
    for (int q = 0; q < kSpanVectors; ++q) {
      const int i = i0 + q * nt;
      if (i < nvec) raw[q] = load_raw<VEC>(span + static_cast<int64_t>(i) * VEC);
    }
    CBAM_UNROLL
    for (int q = 0; q < kSpanVectors; ++q) {
      if (i0 + q * nt >= nvec) continue;  // (and every later q)
      acc_t v[VEC];
      to_acc<VEC>(raw[q], v);
      int rr = row, cc = col;
      for (int u = 0; u < VEC; ++u) {
        s_x[rr * pitch + cc] = v[u];
        if (++cc == K) {
          cc = 0;
          ++rr;
        }
      }
      row += drow;
      col += dcol;
      if (col >= K) {
        col -= K;
        ++row;
      }
    }
  }
  for (int e = nvec * VEC + tid; e < len; e += nt) {  // the span's last len % VEC elements
    const int rr = e / K;
    s_x[rr * pitch + (e - rr * K)] = static_cast<acc_t>(ld(span + e));
  }
  __syncthreads();

  // row ty's lanes: elements k = lane, lane + TX, ... in order, then the xor tree (every thread
  // takes part in the shuffles: blockDim.x is a multiple of 32, TX a power of two up to 32)
  const int ty = tid / TX, lane = tid - ty * TX;
  const int64_t r = r0 + ty;
  State s = pol.init();
  if (ty < rows) {
    if constexpr (Policy::kHasKept) pol.set_kept(s, pol.kept(n, r));
    const acc_t* xr = s_x + ty * pitch;
    for (int k = lane; k < K; k += TX) pol.add(s, xr[k], staged_weight(s_w, k), k, r);
  }
  for (int lane_mask = TX / 2; lane_mask > 0; lane_mask /= 2) {
    pol.combine(s, pol.shfl_xor(s, lane_mask));
  }
  if (lane == 0 && ty < rows) pol.store_final(n * R + r, s);
}

}  // namespace cbam
