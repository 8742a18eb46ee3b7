// The channel gate's head: its MLP on the stacked pools over S, and the sigmoid (csrc/ops.cpp,
// channel_head; DESIGN.md section 1). All in the accumulation dtype (float or double):
//
//   P[i N + n, c] = pool_i[n, c]      the pools in summation order, i < k (blend: k = 1 and
//                                     P[n, c] = 0.5 (avg + max))
//   h[r, j]  = W1[j, :] . P[r, :] + b1[j]                    r < R = k N, j < H
//   two layers:  gc[n, c] = sigmoid(sum over i of (W2[c, :] . act(h[i N + n, :]) + b2[c]))
//   one layer:   gc[n, c] = sigmoid(sum over i of h[i N + n, c])       (H = C)
//
// The op returns gc [N, C], P [R, C] and h [R, H]; h holds act(h) where act is relu (its backward
// needs only the sign), the layer before the activation otherwise (`store_act`). Each dot product
// is summed by one thread in increasing index order, blocked by 32-term chunks (per split, then
// the splits in order), so every result is the same from run to run.
//
// Two kernels, two launches:
//   channel_head_hidden_kernel  h = W1 P (+ b1, act): a block per 32 x 32 tile of h (rows r,
//       hidden units j) and per split of the c axis (kernels/head_gemm.cuh: 256 threads, each 4
//       rows of one j, 32-column chunks of P and W1 staged in shared memory), so P is read
//       ceil(H / 32) times and W1 ceil(R / 32) times, from L2 mostly. The blocks of the first j
//       tile also write P (the stack of the pools: no separate cat). One split: the epilogue
//       adds b1, applies the activation and stores h (FINISH). Several (the launcher splits a
//       long c axis when the tiles alone leave SMs idle): each stores its partial sums
//       [split, R, H], and the tile's last split to finish (kernels/combine_partials.cuh) adds
//       them in split order, b1 and the activation, and stores h.
//   channel_head_gate_kernel    gc: two layers, a block per 32 x 32 tile of gc (samples n,
//       channels c), each thread 4 samples of one c and every pool, staging 32-wide chunks of
//       W2 and of each pool's act(h) along j as above (head_gemm.cuh's staging and chunk sums;
//       W2 is read ceil(N / 32) times, h ceil(C / 32) times); one layer, a thread an element.
// These replace ATen's cat, two linear (addmm), the activation, the sum over the pools and the
// sigmoid (six launches).
#pragma once

#include "kernels/head_gemm.cuh"

namespace cbam {

constexpr int kMaxChannelPools = 4;

// The MLP's activation, as ATen computes it (relu keeps NaN; gelu is the exact, erf form).
enum HeadAct : int { kActRelu = 0, kActSilu = 1, kActGelu = 2, kActIdentity = 3 };

template <typename acc_t>
CBAM_DEVICE acc_t head_act(acc_t v, int act) {
  if (act == kActRelu) return v < acc_t(0) ? acc_t(0) : v;
  if (act == kActSilu) return v / (acc_t(1) + exp_acc(-v));
  if (act == kActGelu) {
    return acc_t(0.5) * v * (acc_t(1) + erf_acc(v * acc_t(0.70710678118654752440)));
  }
  return v;
}

template <typename acc_t>
struct ChannelHeadArgs {
  const acc_t* pools[kMaxChannelPools];  // [N, C] each, in summation order
  int k;                                 // pools summed (1 for the blend)
  bool blend;                            // P = 0.5 (pools[0] + pools[1]), k = 1
  int64_t N, C, H, R;                    // R = k N rows of P and h
  const acc_t* w1;                       // [H, C]
  const acc_t* b1;                       // [H] or nullptr
  const acc_t* w2;                       // [C, H], or nullptr: one layer (H = C)
  const acc_t* b2;                       // [C] or nullptr
  int act;                               // HeadAct
  bool store_act;                        // h holds act(h) (relu of two layers)
  int64_t split_cols;                    // columns of c per split (a multiple of kHeadTile)
  acc_t* p;                              // [R, C]
  acc_t* h;                              // [R, H]
  acc_t* partial;                        // [splits, R, H], or nullptr (one split)
  int* counters;                         // a counter per tile of h (several splits), zero
  acc_t* gc;                             // [N, C]
};

// h's epilogue: + b1, then the activation where h stores it.
template <typename acc_t>
CBAM_DEVICE acc_t head_hidden_out(const ChannelHeadArgs<acc_t>& a, acc_t acc, int64_t j) {
  if (a.b1 != nullptr) acc += ld(a.b1 + j);
  return a.store_act ? head_act(acc, a.act) : acc;
}

// The hidden layer's extra work on P's chunks (head_tile_gemm's extra): the blend's max, loaded
// with the chunk and added at staging (P = 0.5 (avg + max)), and, in the first j tile, P written
// from what is staged. A thread's slot s is P's row r0 + ty + 8 s at column c0 + tx (A's rows
// staged along c: head_slot_row<false>, head_slot_kk<false>).
template <typename acc_t>
struct HiddenP {
  const acc_t* max0;  // the blend's max row of slot 0, or nullptr
  acc_t* p0;          // P's row of slot 0 where this block writes P, or nullptr
  int64_t step;       // from a slot's row to the next's: 8 rows
  int64_t c_end;
  int rows;           // the slots whose rows are P's (r < R): the first `rows`
  acc_t v_max[kHeadStaged];
  CBAM_DEVICE HiddenP(const ChannelHeadArgs<acc_t>& a, int64_t r0, int64_t c_end_,
                      bool writes_p)
      : step(kHeadRowStep * a.C), c_end(c_end_) {
    const int64_t r = r0 + head_slot_row<false>(0);
    const int64_t left = r < a.R ? (a.R - r + kHeadRowStep - 1) / kHeadRowStep : 0;
    rows = static_cast<int>(left < kHeadStaged ? left : kHeadStaged);
    max0 = a.blend && rows > 0 ? a.pools[1] + r * a.C : nullptr;
    p0 = writes_p && rows > 0 ? a.p + r * a.C : nullptr;
    CBAM_UNROLL
    for (int s = 0; s < kHeadStaged; ++s) v_max[s] = acc_t(0);
  }
  CBAM_DEVICE void fetch(int64_t k0, int64_t) {
    const int64_t c = k0 + head_slot_kk<false>(0);
    if (max0 == nullptr || c >= c_end) return;
    CBAM_UNROLL
    for (int s = 0; s < kHeadStaged; ++s) {
      if (s < rows) v_max[s] = ld(max0 + s * step + c);
    }
  }
  CBAM_DEVICE void stage(int64_t k0, acc_t (&v)[kHeadStaged]) {
    const int64_t c = k0 + head_slot_kk<false>(0);
    if (c >= c_end) return;  // (v is 0 there, the blend's too)
    CBAM_UNROLL
    for (int s = 0; s < kHeadStaged; ++s) {
      if (s >= rows) continue;
      if (max0 != nullptr) v[s] = acc_t(0.5) * (v[s] + v_max[s]);
      if (p0 != nullptr) st(p0 + s * step + c, v[s]);
    }
  }
};

// grid (ceil(R / 32), ceil(H / 32), splits), 256 threads: the tile h[r0.., j0..] over this
// split's columns of c (kernels/head_gemm.cuh), A = P (contiguous along c), B = W1 (along c).
template <typename acc_t, bool FINISH>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    channel_head_hidden_kernel(ChannelHeadArgs<acc_t> a) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ HeadTileSmem<acc_t> s_p;  // [row][column of the chunk]
  __shared__ HeadTileSmem<acc_t> s_w;  // [hidden unit][column of the chunk]
  const int tx = static_cast<int>(threadIdx.x) % kHeadTile;
  const int ty = static_cast<int>(threadIdx.x) / kHeadTile;
  const int64_t R = a.R;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kHeadTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kHeadTile;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.z) * a.split_cols;
  const int64_t c_end = c_begin + a.split_cols < a.C ? c_begin + a.split_cols : a.C;
  const bool writes_p = blockIdx.y == 0;  // the first j tile also writes P
  acc_t acc[kHeadRowsPerThread];
  CBAM_UNROLL
  for (int q = 0; q < kHeadRowsPerThread; ++q) acc[q] = acc_t(0);
  // P's row r0 + row: its pool's row (the blend: avg's; HiddenP adds max's)
  const auto p_row = [&](int row) {
    const int64_t r = r0 + row;
    const bool in = r < R;
    const int64_t i = in && !a.blend ? r / a.N : 0;
    return head_matrix_row(in, a.pools[i], (r - i * a.N) * a.C);
  };
  const auto w1_row = [&](int row) {
    return head_matrix_row(j0 + row < a.H, a.w1, (j0 + row) * a.C);
  };
  head_tile_gemm<false, false, true>(c_begin, c_end, p_row, w1_row, s_p, s_w, acc,
                                     HiddenP<acc_t>(a, r0, c_end, writes_p));
  const int64_t j = j0 + tx;
  if constexpr (FINISH) {
    CBAM_UNROLL
    for (int q = 0; q < kHeadRowsPerThread; ++q) {
      const int64_t r = r0 + ty + q * kHeadRowStep;
      if (r < R && j < a.H) st(a.h + r * a.H + j, head_hidden_out(a, acc[q], j));
    }
  } else {  // partials; the tile's last split to finish sums them, + b1, act
    head_split_tile_finish(acc, a.partial, a.counters, R, a.H, r0, j, [&](int64_t r, acc_t sum) {
      st(a.h + r * a.H + j, head_hidden_out(a, sum, j));
    });
  }
}

// Two layers: grid (ceil(N / 32), ceil(C / 32)), 256 threads. One layer: grid-stride over N C.
template <typename acc_t, bool MLP>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    channel_head_gate_kernel(ChannelHeadArgs<acc_t> a) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  const int k = a.k;
  if constexpr (!MLP) {
    const int64_t total = a.N * a.C;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += stride) {
      acc_t z = acc_t(0);
      for (int i = 0; i < k; ++i) z += ld(a.h + i * total + e);  // h: [k N, C]
      st(a.gc + e, acc_t(1) / (acc_t(1) + exp_acc(-z)));
    }
  } else {
    __shared__ HeadQuad<acc_t> s_h[kMaxChannelPools][kHeadTile][kHeadQuads + 1];  // [pool][n][j]
    __shared__ HeadTileSmem<acc_t> s_w;  // [channel][hidden unit of the chunk]
    const int tx = static_cast<int>(threadIdx.x) % kHeadTile;
    const int ty = static_cast<int>(threadIdx.x) / kHeadTile;
    const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kHeadTile;
    const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kHeadTile;
    const bool apply_act = !a.store_act;
    acc_t acc[kMaxChannelPools][kHeadRowsPerThread];  // W2 . act(h) per pool, summed apart
    CBAM_UNROLL
    for (int i = 0; i < kMaxChannelPools; ++i) {
      CBAM_UNROLL
      for (int q = 0; q < kHeadRowsPerThread; ++q) acc[i][q] = acc_t(0);
    }
    // a chunk of W2 (once for every pool: W2 is read once per sample tile) and of each pool's
    // act(h), both along j (head_gemm.cuh), the next one fetched while this one is summed
    const auto w2_rows = head_rows<false>([&](int row) {
      const bool in = c0 + row < a.C;
      const acc_t* src = in ? a.w2 + (c0 + row) * a.H : nullptr;
      return [=](int64_t j) { return in ? ld(src + j) : acc_t(0); };
    });
    // pool 0's rows of h; pool i's are N H further
    const int64_t pool_stride = a.N * a.H;
    const int act = a.act;
    const auto h_rows = head_rows<false>([&](int row) {
      const bool in = n0 + row < a.N;
      const acc_t* src = in ? a.h + (n0 + row) * a.H : nullptr;
      return [=](int64_t j, int i) { return in ? ld(src + i * pool_stride + j) : acc_t(0); };
    });
    acc_t vw[kHeadStaged], vh[kMaxChannelPools][kHeadStaged];
    const auto fetch = [&](int64_t j0) {
      head_fetch<false>(j0, a.H, w2_rows, vw);
      CBAM_UNROLL
      for (int s = 0; s < kHeadStaged; ++s) {
        const int64_t j = j0 + head_slot_kk<false>(s);
        CBAM_UNROLL
        for (int i = 0; i < kMaxChannelPools; ++i) {
          if (i < k) vh[i][s] = j < a.H ? h_rows.rows[s](j, i) : acc_t(0);
        }
      }
    };
    fetch(0);
    for (int64_t j0 = 0; j0 < a.H; j0 += kHeadTile) {
      __syncthreads();  // the previous chunk is no longer read
      head_stage<false>(s_w, vw);
      CBAM_UNROLL
      for (int i = 0; i < kMaxChannelPools; ++i) {
        if (i >= k) continue;
        if (apply_act) {  // here, not as each is loaded: the chunk's loads are issued together
          CBAM_UNROLL  // (act(0) = 0: the zeros past H stay zeros)
          for (int s = 0; s < kHeadStaged; ++s) vh[i][s] = head_act(vh[i][s], act);
        }
        head_stage<false>(s_h[i], vh[i]);
      }
      __syncthreads();
      if (j0 + kHeadTile < a.H) fetch(j0 + kHeadTile);
      const int quads = head_quads(a.H - j0);
      CBAM_UNROLL
      for (int i = 0; i < kMaxChannelPools; ++i) {  // (unrolled: acc stays in registers)
        if (i >= k) continue;
        acc_t part[kHeadRowsPerThread];  // the chunk's sum, then added: a blocked sum
        CBAM_UNROLL
        for (int q = 0; q < kHeadRowsPerThread; ++q) part[q] = acc_t(0);
        head_chunk_sum(s_h[i], s_w, quads, part);
        CBAM_UNROLL
        for (int q = 0; q < kHeadRowsPerThread; ++q) acc[i][q] += part[q];
      }
    }
    const int64_t c = c0 + tx;
    if (c >= a.C) return;
    const acc_t bias = a.b2 != nullptr ? ld(a.b2 + c) : acc_t(0);
    CBAM_UNROLL
    for (int q = 0; q < kHeadRowsPerThread; ++q) {
      const int64_t n = n0 + ty + q * kHeadRowStep;
      if (n >= a.N) continue;
      acc_t z = acc_t(0);  // sum over the pools of (W2 . act(h_i) + b2), in pool order
      CBAM_UNROLL
      for (int i = 0; i < kMaxChannelPools; ++i) {
        if (i < k) z += acc[i][q] + bias;
      }
      st(a.gc + n * a.C + c, acc_t(1) / (acc_t(1) + exp_acc(-z)));
    }
  }
}

}  // namespace cbam
