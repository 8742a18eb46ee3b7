// Reduction over the contiguous axis k of x [N, R, K] when the rows are short (K * sizeof(acc_t)
// <= kShortRowBytes: a channels-first 7x7 map, a channels-last layer of a few dozen channels):
// one thread per row.
//
//   out[n, r] = fold over k of Policy::add(x[n, r, k], w[n, k])       (pool_policies.cuh)
//
// Pass: reads x once. reduce_k.cuh spreads a row over a group of lanes and combines them by
// shuffles: for a row of 49 elements that tree, the row's bookkeeping and its stores cost about
// 130 warp instructions a row (the float32 7x7 pool ran at 20% of the copy bandwidth on an H200,
// bound by instructions, not bytes). Here a block takes blockDim.x consecutive rows of one
// sample, which are one contiguous span of rows * K elements: the threads copy the span into
// shared memory with coalesced loads (16-byte vectors when the launcher found every span
// aligned: VEC > 1; kSpanVectors loads in flight per thread), converted to acc_t, at row pitch
// K | 1 (odd: the threads reading element k of their rows hit distinct banks); the weights
// w[n, 0..K) are staged once. Then each thread
// folds its row's K elements in order of k and stores the row's result: no shuffles, no
// partials. Grid: N * ceil(R / blockDim.x) blocks, 1-D.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

constexpr int kShortRowBytes = 256;  // K * sizeof(acc_t) at most: K <= 64 (float), 32 (double)
constexpr int kShortRows = 128;      // rows (threads) per block
constexpr int kSpanVectors = 4;      // loads a thread has in flight while copying the span

template <typename T, int VEC, typename Policy>
CBAM_GLOBAL void reduce_k_rows_kernel(const T* __restrict__ x, Policy pol, int64_t R, int K) {
  using acc_t = typename Policy::acc_t;
  using State = typename Policy::State;
  constexpr int kMaxK = kShortRowBytes / static_cast<int>(sizeof(acc_t));
  __shared__ acc_t s_x[kShortRows * (kMaxK + 1)];
  __shared__ typename Policy::Weight s_w[kMaxK];
  const int nt = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int64_t chunks = (R + nt - 1) / nt;
  const int64_t n = static_cast<int64_t>(blockIdx.x) / chunks;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) % chunks) * nt;
  const int rows = static_cast<int>(R - r0 < nt ? R - r0 : nt);
  const int pitch = K | 1;

  for (int k = tid; k < K; k += nt) s_w[k] = pol.weight(n, k);
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

  if (tid < rows) {
    const int64_t r = r0 + tid;
    State s = pol.init();
    if constexpr (Policy::kHasKept) pol.set_kept(s, pol.kept(n, r));
    const acc_t* xr = s_x + tid * pitch;
    for (int k = 0; k < K; ++k) pol.add(s, xr[k], s_w[k], k, r);
    pol.store_final(n * R + r, s);
  }
}

}  // namespace cbam
