// The spatial gate's BatchNorm with batch statistics (one channel, training mode) and its sigmoid,
// forward and backward (ops batch_norm_gate and batch_norm_gate_backward; DESIGN.md section 1).
// z is the conv output zconv [N, 1, *spatial] flattened: M = N S values.
//
// Forward:  mean = sum z / M,  var = sum (z - mean)^2 / M,  invstd = 1 / sqrt(var + eps)
//           gs = sigmoid((z - mean) invstd w + b)       (w = 1, b = 0 without affine)
//           var_u = sum (z - mean)^2 / (M - 1)          (for the running variance)
// Backward: dzs = dgs gs (1 - gs),  xhat = (z - mean) invstd   (the forward's mean and invstd)
//           A = sum dzs,  B = sum dzs xhat
//           dz = (dzs - A / M - xhat B / M) invstd w,   d bn_w = B,  d bn_b = A
// (ATen's native_batch_norm and native_batch_norm_backward in training mode, with the sigmoid.)
//
// Two launches each way, no atomics, the same bits every run:
// 1. *_partials_kernel: block b of P owns the values [M b / P, M (b + 1) / P). Forward: its
//    (count, mean, m2): the block's sum gives the range's mean, a second walk over the range
//    (L1 / L2 hits) the centred squares; backward: its sums of dzs and dzs xhat. One partial per
//    block: [3, P] or [2, P].
// 2. *_apply_kernel: each block first combines all P partials in one fixed order (thread t folds
//    p = t, t + blockDim.x, ..., then a halving tree in shared memory; Chan's formula merges
//    (count, mean, m2)), so every block holds the same totals bit for bit; then a grid-stride
//    loop writes gs (dz) at each position. Block 0 also writes the statistics (mean, invstd,
//    var_u; d bn_w, d bn_b).
// Bytes: the forward reads z three times (the partials' second walk over a block's range of a few
// kilobytes hits L1) and writes gs; the backward reads dgs, gs and z twice and writes dz: M-sized
// tensors, small next to x.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

// (count, mean, sum of squared deviations) of a set of values.
template <typename acc_t>
struct Moments {
  acc_t n, mean, m2;
};

// The moments of the union of two disjoint sets (Chan, Golub and LeVeque).
template <typename acc_t>
CBAM_DEVICE Moments<acc_t> merge_moments(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t n = a.n + b.n, d = b.mean - a.mean, f = b.n / n;
  return {n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}

// The sum of v over the block (blockDim.x a power of two, at most kBlockThreads): a halving tree
// in s; every thread gets it. Holds barriers: every thread of the block calls it.
template <typename acc_t>
CBAM_DEVICE acc_t bn_block_sum(acc_t v, acc_t* s) {
  const int tid = threadIdx.x;
  s[tid] = v;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h /= 2) {
    if (tid < h) s[tid] += s[tid + h];
    __syncthreads();
  }
  const acc_t total = s[0];
  __syncthreads();  // s is free again for the caller's next sum
  return total;
}

// Block b's range [lo, hi) of M values split into gridDim.x ranges.
struct BnRange {
  int64_t lo, hi;
};

CBAM_DEVICE BnRange bn_range(int64_t M) {
  const int64_t P = gridDim.x, b = blockIdx.x;
  return {M * b / P, M * (b + 1) / P};
}

template <typename acc_t>
struct BatchNormGateArgs {
  const acc_t* z;         // [M]
  int64_t M;              // > 1 (launcher)
  const acc_t* partials;  // [3, P]: count, mean, m2 of each block of the partials kernel
  int64_t P;
  const acc_t* bn_w;  // [1] or nullptr
  const acc_t* bn_b;  // [1] or nullptr
  acc_t eps;
  acc_t* gs;      // [M]
  acc_t* mean;    // [1]
  acc_t* invstd;  // [1]
  acc_t* var;     // [1]: unbiased
};

template <typename acc_t>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    batch_norm_gate_partials_kernel(const acc_t* z, int64_t M, acc_t* partials) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ acc_t s_sum[kBlockThreads];
  const BnRange r = bn_range(M);  // never empty: P <= M (launcher)
  acc_t sum = acc_t(0);
  for (int64_t i = r.lo + threadIdx.x; i < r.hi; i += blockDim.x) sum += ld(z + i);
  const acc_t count = static_cast<acc_t>(r.hi - r.lo);
  const acc_t mean = bn_block_sum(sum, s_sum) / count;
  acc_t sq = acc_t(0);
  for (int64_t i = r.lo + threadIdx.x; i < r.hi; i += blockDim.x) {
    const acc_t d = ld(z + i) - mean;
    sq += d * d;
  }
  const acc_t m2 = bn_block_sum(sq, s_sum);
  if (threadIdx.x == 0) {
    const int64_t P = gridDim.x;
    st(partials + blockIdx.x, count);
    st(partials + P + blockIdx.x, mean);
    st(partials + 2 * P + blockIdx.x, m2);
  }
}

template <typename acc_t>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    batch_norm_gate_apply_kernel(BatchNormGateArgs<acc_t> a) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ acc_t s_n[kBlockThreads];
  __shared__ acc_t s_mean[kBlockThreads];
  __shared__ acc_t s_m2[kBlockThreads];
  __shared__ acc_t s_affine[2];  // bn_w, bn_b (1, 0 when absent): read once a block
  const int tid = threadIdx.x;
  if (tid == 0) {
    s_affine[0] = a.bn_w != nullptr ? ld(a.bn_w) : acc_t(1);
    s_affine[1] = a.bn_b != nullptr ? ld(a.bn_b) : acc_t(0);
  }
  Moments<acc_t> m{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t p = tid; p < a.P; p += blockDim.x) {
    m = merge_moments(m, Moments<acc_t>{ld(a.partials + p), ld(a.partials + a.P + p),
                                        ld(a.partials + 2 * a.P + p)});
  }
  s_n[tid] = m.n;
  s_mean[tid] = m.mean;
  s_m2[tid] = m.m2;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h /= 2) {
    if (tid < h) {
      const Moments<acc_t> t = merge_moments(Moments<acc_t>{s_n[tid], s_mean[tid], s_m2[tid]},
                                             Moments<acc_t>{s_n[tid + h], s_mean[tid + h],
                                                            s_m2[tid + h]});
      s_n[tid] = t.n;
      s_mean[tid] = t.mean;
      s_m2[tid] = t.m2;
    }
    __syncthreads();
  }
  const acc_t mean = s_mean[0], m2 = s_m2[0];
  const acc_t invstd = acc_t(1) / sqrt_acc(m2 / static_cast<acc_t>(a.M) + a.eps);
  const acc_t scale = invstd * s_affine[0], shift = s_affine[1];
  if (blockIdx.x == 0 && tid == 0) {
    st(a.mean, mean);
    st(a.invstd, invstd);
    st(a.var, m2 / static_cast<acc_t>(a.M - 1));
  }
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid; i < a.M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t zs = (ld(a.z + i) - mean) * scale + shift;
    st(a.gs + i, acc_t(1) / (acc_t(1) + exp_acc(-zs)));
  }
}

template <typename acc_t>
struct BatchNormGateBackwardArgs {
  const acc_t* dgs;       // [M]
  const acc_t* gs;        // [M]
  const acc_t* z;         // [M]
  int64_t M;
  const acc_t* mean;      // [1]
  const acc_t* invstd;    // [1]
  const acc_t* bn_w;      // [1] or nullptr
  const acc_t* partials;  // [2, P]: sums of dzs and of dzs xhat of each block
  int64_t P;
  acc_t* dz;     // [M]
  acc_t* dbn_w;  // [1] or nullptr (not asked for)
  acc_t* dbn_b;  // [1] or nullptr
};

// dzs = dgs gs (1 - gs) at i.
template <typename acc_t>
CBAM_DEVICE acc_t bn_gate_dzs(const BatchNormGateBackwardArgs<acc_t>& a, int64_t i) {
  const acc_t y = ld(a.gs + i);
  return ld(a.dgs + i) * (acc_t(1) - y) * y;
}

template <typename acc_t>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    batch_norm_gate_backward_partials_kernel(BatchNormGateBackwardArgs<acc_t> a,
                                             acc_t* partials) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ acc_t s_sum[kBlockThreads];
  __shared__ acc_t s_stats[2];  // mean, invstd: read once a block
  if (threadIdx.x == 0) {
    s_stats[0] = ld(a.mean);
    s_stats[1] = ld(a.invstd);
  }
  __syncthreads();
  const BnRange r = bn_range(a.M);
  const acc_t mean = s_stats[0], invstd = s_stats[1];
  acc_t sa = acc_t(0), sb = acc_t(0);
  for (int64_t i = r.lo + threadIdx.x; i < r.hi; i += blockDim.x) {
    const acc_t dzs = bn_gate_dzs(a, i);
    sa += dzs;
    sb += dzs * ((ld(a.z + i) - mean) * invstd);
  }
  const acc_t ta = bn_block_sum(sa, s_sum);
  const acc_t tb = bn_block_sum(sb, s_sum);
  if (threadIdx.x == 0) {
    st(partials + blockIdx.x, ta);
    st(partials + gridDim.x + blockIdx.x, tb);
  }
}

template <typename acc_t>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    batch_norm_gate_backward_apply_kernel(BatchNormGateBackwardArgs<acc_t> a) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ acc_t s_sum[kBlockThreads];
  __shared__ acc_t s_stats[3];  // mean, invstd, bn_w (1 when absent): read once a block
  const int tid = threadIdx.x;
  if (tid == 0) {
    s_stats[0] = ld(a.mean);
    s_stats[1] = ld(a.invstd);
    s_stats[2] = a.bn_w != nullptr ? ld(a.bn_w) : acc_t(1);
  }
  acc_t sa = acc_t(0), sb = acc_t(0);
  for (int64_t p = tid; p < a.P; p += blockDim.x) {
    sa += ld(a.partials + p);
    sb += ld(a.partials + a.P + p);
  }
  const acc_t A = bn_block_sum(sa, s_sum), B = bn_block_sum(sb, s_sum);  // (barriers)
  const acc_t mean = s_stats[0], invstd = s_stats[1];
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(a.M);
  const acc_t mean_dzs = A * inv_m, mean_dzs_xhat = B * inv_m;
  const acc_t scale = invstd * s_stats[2];
  if (blockIdx.x == 0 && tid == 0) {
    if (a.dbn_w != nullptr) st(a.dbn_w, B);
    if (a.dbn_b != nullptr) st(a.dbn_b, A);
  }
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid; i < a.M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t xhat = (ld(a.z + i) - mean) * invstd;
    st(a.dz + i, (bn_gate_dzs(a, i) - mean_dzs - xhat * mean_dzs_xhat) * scale);
  }
}

}  // namespace cbam
