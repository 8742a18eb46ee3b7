// The channel gate's head backward (csrc/ops.cpp, channel_head_backward; the forward in
// kernels/channel_head.cuh). From dzc [N, C], the gradient of the gate's logits (every pool's MLP
// output receives it), and what the forward saved, P [R, C] and h [R, H] (R = k N, row
// r = i N + n for pool i):
//
//   two layers:  dh[r, j]  = act'(h[r, j]) (sum over c of dzc[n, c] W2[c, j])
//                dW2[c, j] = sum over n of dzc[n, c] (sum over i of act(h[i N + n, j]))
//                db2[c]    = k (sum over n of dzc[n, c])
//   one layer:   dh[r, j]  = dzc[n, j]                    (H = C)
//   both:        dW1[j, c] = sum over r of dh[r, j] P[r, c],   db1[j] = sum over r of dh[r, j]
//                dP[r, c]  = sum over j of dh[r, j] W1[j, c]   (blend: 0.5 of it, [N, C]: the
//                            gradient of avg and of max alike)
//
// act' is ATen's backward of the activation at h (relu: 0 where h <= 0, which is where the
// saved act(h) is, NaN passing; silu, exact gelu; identity). Every sum is one thread's, blocked
// in 32-term chunks, in a fixed order: no atomics, the same result every run.
//
// Kernels, one or two launches:
//   channel_head_bwd_hidden_kernel  (two layers) g = dzc W2 as 32 x 32 tiles of [N, H]
//       (kernels/head_gemm.cuh) over a split of c; one split: the epilogue writes dh for every
//       pool (FINISH); several: partial sums [split, N, H], which the tile's last split to finish
//       adds in split order before it writes dh (kernels/combine_partials.cuh).
//   channel_head_bwd_params_kernel  one launch, its blocks in five segments: the tiles of dW2
//       ([C, H], K = N), of dW1 ([H, C], K = R), of dP ([R, C], K = H), then db1 and db2, a
//       thread a column. They replace ATen's repeat, four mm, two sums and the activation's
//       backward (eight launches).
#pragma once

#include "kernels/channel_head.cuh"

namespace cbam {

template <typename acc_t>
struct ChannelHeadBwdArgs {
  const acc_t* dzc;  // [N, C]
  const acc_t* p;    // [R, C]
  const acc_t* h;    // [R, H], act(h) where store_act
  const acc_t* w1;   // [H, C]
  const acc_t* w2;   // [C, H], or nullptr: one layer
  int64_t N, C, H, R;
  int k;            // pools summed (1 for the blend); R = k N
  bool blend;       // dP is halved
  int act;          // HeadAct
  bool store_act;   // h holds act(h)
  int64_t split_cols;
  acc_t* dh;       // [R, H] (two layers; one layer reads dzc instead)
  acc_t* partial;  // [splits, N, H] or nullptr
  int* counters;   // a counter per tile of g (several splits), zero
  acc_t* dp;       // [R, C]
  acc_t* dw1;      // [H, C]
  acc_t* db1;      // [H] or nullptr
  acc_t* dw2;      // [C, H] or nullptr
  acc_t* db2;      // [C] or nullptr
  // the params kernel's segments: first block of each (dW2, dW1, dP, db1, db2), then the end
  int64_t seg[6];
};

// The activation's backward at h for the incoming gradient g (as ATen's threshold_backward,
// silu_backward, gelu_backward; h is act(h) where store_act, which only relu does).
template <typename acc_t>
CBAM_DEVICE acc_t head_act_backward(acc_t g, acc_t h, int act) {
  if (act == kActRelu) return h <= acc_t(0) ? acc_t(0) : g;
  if (act == kActSilu) {
    const acc_t s = acc_t(1) / (acc_t(1) + exp_acc(-h));
    return g * s * (acc_t(1) + h * (acc_t(1) - s));
  }
  if (act == kActGelu) {
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + erf_acc(h * acc_t(0.70710678118654752440)));
    const acc_t pdf = exp_acc(acc_t(-0.5) * h * h) * acc_t(0.39894228040143267794);
    return g * (cdf + h * pdf);
  }
  return g;
}

// dh[i N + n, j] for every pool i from g = (dzc W2)[n, j].
template <typename acc_t>
CBAM_DEVICE void head_store_dh(const ChannelHeadBwdArgs<acc_t>& a, acc_t g, int64_t n,
                               int64_t j) {
  for (int i = 0; i < a.k; ++i) {
    const int64_t o = (i * a.N + n) * a.H + j;
    st(a.dh + o, head_act_backward(g, ld(a.h + o), a.act));
  }
}

// grid (ceil(N / 32), ceil(H / 32), splits): g's tile over this split's c, A = dzc (contiguous
// along c), B(j, c) = W2[c, j] (contiguous along j).
template <typename acc_t, bool FINISH>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    channel_head_bwd_hidden_kernel(ChannelHeadBwdArgs<acc_t> a) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ HeadTileSmem<acc_t> s_a;
  __shared__ HeadTileSmem<acc_t> s_b;
  const int tx = static_cast<int>(threadIdx.x) % kHeadTile;
  const int ty = static_cast<int>(threadIdx.x) / kHeadTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kHeadTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kHeadTile;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.z) * a.split_cols;
  const int64_t c_end = c_begin + a.split_cols < a.C ? c_begin + a.split_cols : a.C;
  acc_t acc[kHeadRowsPerThread];
  CBAM_UNROLL
  for (int q = 0; q < kHeadRowsPerThread; ++q) acc[q] = acc_t(0);
  const auto dz_row = [&](int row) {  // A(n, c) = dzc[n, c]
    return head_matrix_row(n0 + row < a.N, a.dzc, (n0 + row) * a.C);
  };
  const auto w2_col = [&](int col) {  // B(j, c) = W2[c, j], a column of W2
    return head_matrix_row(j0 + col < a.H, a.w2, j0 + col, a.H);
  };
  head_tile_gemm<false, true, true>(c_begin, c_end, dz_row, w2_col, s_a, s_b, acc);
  const int64_t j = j0 + tx;
  if constexpr (FINISH) {
    CBAM_UNROLL
    for (int q = 0; q < kHeadRowsPerThread; ++q) {
      const int64_t n = n0 + ty + q * kHeadRowStep;
      if (n < a.N && j < a.H) head_store_dh(a, acc[q], n, j);
    }
  } else {  // partials; the tile's last split to finish sums them and writes dh
    head_split_tile_finish(acc, a.partial, a.counters, a.N, a.H, n0, j,
                           [&](int64_t n, acc_t g) { head_store_dh(a, g, n, j); });
  }
}

// One launch, blocks by segment (a.seg); the segment is the same for every thread of a block, so
// the tiles' barriers are uniform.
template <typename acc_t, bool MLP>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    channel_head_bwd_params_kernel(ChannelHeadBwdArgs<acc_t> a) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ HeadTileSmem<acc_t> s_a;
  __shared__ HeadTileSmem<acc_t> s_b;
  const int tx = static_cast<int>(threadIdx.x) % kHeadTile;
  const int ty = static_cast<int>(threadIdx.x) / kHeadTile;
  const int64_t b = blockIdx.x;
  // dh[r, j]: the first kernel's output, or (one layer) dzc of r's sample; dh_of(r) points at
  // row r (j along it)
  const int64_t N = a.N, C = a.C, H = a.H;
  const auto dh_of = [&](int64_t r) {
    if constexpr (MLP) {
      return a.dh + r * H;
    } else {
      int64_t n = r;  // r % N, r < k N with k <= 4
      while (n >= N) n -= N;
      return a.dzc + n * C;
    }
  };
  acc_t acc[kHeadRowsPerThread];
  CBAM_UNROLL
  for (int q = 0; q < kHeadRowsPerThread; ++q) acc[q] = acc_t(0);
  // the tile at (row0, col0) of out [rows, cols] (row-major), times scale
  const auto store_tile = [&](acc_t* out, int64_t rows, int64_t cols, int64_t row0,
                              int64_t col0, acc_t scale) {
    const int64_t col = col0 + tx;
    if (col >= cols) return;
    CBAM_UNROLL
    for (int q = 0; q < kHeadRowsPerThread; ++q) {
      const int64_t row = row0 + ty + q * kHeadRowStep;
      if (row < rows) st(out + row * cols + col, scale * acc[q]);
    }
  };
  if (b < a.seg[1]) {  // dW2[c, j], K = N: A(c, n) = dzc[n, c], B(j, n) = sum_i act(h[i N + n, j])
    if constexpr (MLP) {
      const int64_t t = b - a.seg[0], tiles_j = (a.H + kHeadTile - 1) / kHeadTile;
      const int64_t c0 = (t / tiles_j) * kHeadTile, j0 = (t % tiles_j) * kHeadTile;
      const auto dz_col = [&](int row) {  // A(c, n) = dzc[n, c], a column of dzc
        return head_matrix_row(c0 + row < C, a.dzc, c0 + row, C);
      };
      const int k = a.k, act = a.act;
      const bool store_act = a.store_act;
      const auto act_col = [&](int col) {  // B(j, n) = sum over i of act(h[i N + n, j])
        const bool in = j0 + col < H;
        const acc_t* src = in ? a.h + j0 + col : nullptr;
        return [=](int64_t n) {
          if (!in) return acc_t(0);
          acc_t s = acc_t(0);
          for (int i = 0; i < k; ++i) {
            const acc_t v = ld(src + (i * N + n) * H);
            s += store_act ? v : head_act(v, act);
          }
          return s;
        };
      };
      head_tile_gemm<true, true, false>(0, N, dz_col, act_col, s_a, s_b, acc);
      store_tile(a.dw2, a.C, a.H, c0, j0, acc_t(1));
    }
  } else if (b < a.seg[2]) {  // dW1[j, c], K = R: A(j, r) = dh[r, j], B(c, r) = P[r, c]
    const int64_t t = b - a.seg[1], tiles_c = (a.C + kHeadTile - 1) / kHeadTile;
    const int64_t j0 = (t / tiles_c) * kHeadTile, c0 = (t % tiles_c) * kHeadTile;
    const auto dh_col = [&](int row) {  // A(j, r) = dh[r, j], a column of dh
      const bool in = j0 + row < H;
      const int64_t j = j0 + row;
      return [=](int64_t r) { return in ? ld(dh_of(r) + j) : acc_t(0); };
    };
    const auto p_col = [&](int col) {  // B(c, r) = P[r, c], a column of P
      return head_matrix_row(c0 + col < C, a.p, c0 + col, C);
    };
    head_tile_gemm<true, true, false>(0, a.R, dh_col, p_col, s_a, s_b, acc);
    store_tile(a.dw1, a.H, a.C, j0, c0, acc_t(1));
  } else if (b < a.seg[3]) {  // dP[r, c], K = H: A(r, j) = dh[r, j], B(c, j) = W1[j, c]
    const int64_t t = b - a.seg[2], tiles_c = (a.C + kHeadTile - 1) / kHeadTile;
    const int64_t r0 = (t / tiles_c) * kHeadTile, c0 = (t % tiles_c) * kHeadTile;
    const auto dh_row = [&](int row) {  // A(r, j) = dh[r, j]
      const bool in = r0 + row < a.R;
      return head_matrix_row<acc_t>(in, in ? dh_of(r0 + row) : nullptr, 0);
    };
    const auto w1_col = [&](int col) {  // B(c, j) = W1[j, c], a column of W1
      return head_matrix_row(c0 + col < C, a.w1, c0 + col, C);
    };
    head_tile_gemm<false, true, false>(0, H, dh_row, w1_col, s_a, s_b, acc);
    store_tile(a.dp, a.R, a.C, r0, c0, a.blend ? acc_t(0.5) : acc_t(1));
  } else if (b < a.seg[4]) {  // db1[j] = sum over r of dh[r, j]
    const int64_t j = (b - a.seg[3]) * kBlockThreads + threadIdx.x;
    if (j < a.H) {
      st(a.db1 + j, head_blocked_sum<acc_t>(a.R, [&](int64_t r) { return ld(dh_of(r) + j); }));
    }
  } else {  // db2[c] = k (sum over n of dzc[n, c])
    const int64_t c = (b - a.seg[4]) * kBlockThreads + threadIdx.x;
    if (c < a.C) {
      const acc_t s =
          head_blocked_sum<acc_t>(a.N, [&](int64_t n) { return ld(a.dzc + n * a.C + c); });
      st(a.db2 + c, static_cast<acc_t>(a.k) * s);
    }
  }
}

}  // namespace cbam
