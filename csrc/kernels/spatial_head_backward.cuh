// The spatial gate's head, backward, in two kernels (csrc/ops.cpp, spatial_head_backward; the
// forward is kernels/spatial_head.cuh, whose notation this keeps):
//
//   dzs[n, p]    = grad gs (1 - gs)            (the sigmoid's backward; without gs, dzs = grad)
//   dzconv[n, p] = dzs invstd bn_w             (BatchNorm in eval mode; dzs without BatchNorm)
//   dmap[n, c, p] = sum over the taps t of w[c, t] dzconv[n, p - t + k/2]   (inside the map)
//   (du, dv)     = (dmap[1], dmap[0]) "max,mean", (dmap[0], dmap[1]) "mean,max",
//                  (0.5 dmap[0], 0.5 dmap[0]) "blend"
//   dw[c, t]     = sum over n, q of dzconv[n, q] map[n, c, q + t - k/2]      (inside the map)
//   db = sum dzconv,  dbn_w = sum dzs (zconv - rm) invstd,  dbn_b = sum dzs
//
// Pass 1, spatial_head_backward_kernel: a block per chunk of blockDim.x consecutive positions of
// the flattened [N, S] (a grid-stride loop over the chunks; blockDim.x is 64, 128 or 256, the
// launcher's choice, with L <= blockDim.x kMaxHeadSlotsPerThread). STAGED: the block stages dzs
// and the map over its chunk plus `reach` positions either side in shared memory (grad, gs and
// smap read once per staged position); otherwise the taps read global memory. Every sum is of
// dzs, and the scale invstd bn_w (linear) is applied once to its total. Each thread writes du
// and dv at its own position (its dmap: the taps' transpose, row by row clipped to the map).
// Then the block folds the chunk's part of the L = cin k^d + 3 parameter sums (the weights in
// row-major order, then db, dbn_w, dbn_b: "slots") into registers: a thread per slot, and where
// L is small G = blockDim.x / L groups of threads that split the chunk into G runs. Each block
// writes its G partial sums of every slot once, to partials [L, gridDim.x G].
// Pass 2, spatial_head_backward_combine_kernel: a block per slot sums its partials, each thread a
// strided share in order, then a tree in shared memory: a fixed order, so the sums are
// deterministic (no atomics). Writes dw, db, dbn_w and dbn_b (those asked for).
// Replaces the ATen sigmoid_backward, batch_norm_backward, convolution_backward and the copy that
// split dmap (five to seven launches with cuDNN's) with two.
#pragma once

#include "kernels/spatial_head.cuh"

namespace cbam {

constexpr int kHeadBackwardExtras = 3;  // the slots after the weights': db, dbn_w, dbn_b
// slots a thread folds when L > blockDim.x (one group): enough for kMaxHeadTaps at kBlockThreads
constexpr int kMaxHeadSlotsPerThread =
    (kMaxHeadTaps + kHeadBackwardExtras + kBlockThreads - 1) / kBlockThreads;

template <typename acc_t>
struct SpatialHeadBackwardArgs : HeadGeom {
  const acc_t* grad;   // [N, S]: d gs, or d zconv without gs
  const acc_t* gs;     // [N, S] or nullptr
  const acc_t* smap;   // [N, cin, S] the forward's stacked map
  const acc_t* zconv;  // [N, S] (with BatchNorm; read for dbn_w) or nullptr
  const acc_t* w;      // [1, cin, k...] contiguous
  // BatchNorm in eval mode: bn_rm, bn_rv both given or both nullptr; bn_w may be nullptr alone
  const acc_t* bn_w;
  const acc_t* bn_rm;
  const acc_t* bn_rv;
  acc_t bn_eps;
  acc_t* du;        // [N, S]
  acc_t* dv;        // [N, S]
  acc_t* partials;  // [L, P], P = gridDim.x * groups
  int L;           // cin kd kh kw + kHeadBackwardExtras
  int groups;      // G: blockDim.x / L when L <= blockDim.x, else 1 (then L <= blockDim.x
                   // kMaxHeadSlotsPerThread)
};

// The BatchNorm (eval) constants of the backward: dzconv = dzs scale,
// xhat = (zconv - mean) invstd.
template <typename acc_t>
struct HeadBnBackward {
  bool bn = false;
  acc_t mean = acc_t(0), invstd = acc_t(1), scale = acc_t(1);

  CBAM_DEVICE explicit HeadBnBackward(const SpatialHeadBackwardArgs<acc_t>& a) {
    if (a.bn_rv == nullptr) return;
    bn = true;
    mean = ld(a.bn_rm);
    invstd = acc_t(1) / sqrt_acc(ld(a.bn_rv) + a.bn_eps);
    scale = a.bn_w != nullptr ? invstd * ld(a.bn_w) : invstd;
  }
};

// dzs at flat offset o of [N, S].
template <typename acc_t>
CBAM_DEVICE acc_t head_dzs_at(const SpatialHeadBackwardArgs<acc_t>& a, int64_t o) {
  const acc_t g = ld(a.grad + o);
  if (a.gs == nullptr) return g;
  const acc_t y = ld(a.gs + o);
  return g * (acc_t(1) - y) * y;
}

template <typename acc_t, bool STAGED>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    spatial_head_backward_kernel(SpatialHeadBackwardArgs<acc_t> a) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ acc_t s_w[kMaxHeadTaps];
  __shared__ acc_t s_own[2 * kBlockThreads];  // the chunk's dzs, then dzs xhat
  CBAM_DYNAMIC_SMEM(acc_t, s_stage);  // STAGED: dzs [span], then the map [cin][span]
  const int taps = a.cin * a.kd * a.kh * a.kw;
  for (int i = threadIdx.x; i < taps; i += blockDim.x) s_w[i] = ld(a.w + i);
  const HeadBnBackward<acc_t> bn(a);
  const int rd = a.kd / 2, rh = a.kh / 2, rw = a.kw / 2;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t total = a.N * a.S;
  const int64_t span = nthreads + 2 * a.reach;
  acc_t* s_dz = s_stage;
  acc_t* s_map = s_stage + span;

  // This thread's slots: slot(r) for r < nslots, in the run [run_lo, run_hi) of every chunk.
  const int G = a.groups;
  const int nslots = G > 1 ? (tid < G * a.L ? 1 : 0)
                           : (a.L - tid + nthreads - 1) / nthreads;  // tid + r nthreads < L
  const int group = G > 1 ? tid / a.L : 0;
  const int run_lo = group * nthreads / G, run_hi = (group + 1) * nthreads / G;
  const auto slot = [&](int r) { return G > 1 ? tid % a.L : tid + r * nthreads; };
  acc_t part[kMaxHeadSlotsPerThread];
  CBAM_UNROLL
  for (int r = 0; r < kMaxHeadSlotsPerThread; ++r) part[r] = acc_t(0);

  // chunk starts: the same for every thread of the block (the barriers below are uniform)
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * nthreads; c0 < total;
       c0 += static_cast<int64_t>(gridDim.x) * nthreads) {
    const int64_t lo = c0 - a.reach;  // flat position of s_dz[0] and s_map[c][0]
    __syncthreads();  // (the weights; the previous chunk's stage is no longer read)
    // dzs (and dzs xhat) at position c0 + i of the chunk into s_own; entries past the end of
    // [N, S] are never read
    const auto own = [&](int64_t g, int i) {
      const acc_t dzs = head_dzs_at(a, g);
      s_own[i] = dzs;
      s_own[nthreads + i] = bn.bn ? dzs * ((ld(a.zconv + g) - bn.mean) * bn.invstd) : acc_t(0);
      return dzs;
    };
    if constexpr (STAGED) {  // grad and gs read once per staged position, own chunk included
      for (int64_t i = tid; i < span; i += nthreads) {
        const int64_t g = lo + i;
        if (g < 0 || g >= total) continue;  // never read: outside the map by coordinates
        const int64_t i_own = i - a.reach;
        s_dz[i] = i_own >= 0 && i_own < nthreads ? own(g, static_cast<int>(i_own))
                                                  : head_dzs_at(a, g);
        const int64_t n = g / a.S;
        const acc_t* m = a.smap + n * a.cin * a.S + (g - n * a.S);
        for (int c = 0; c < a.cin; ++c) s_map[c * span + i] = ld(m + c * a.S);
      }
    } else if (c0 + tid < total) {
      own(c0 + tid, tid);
    }
    __syncthreads();
    const auto dzs_at = [&](int64_t g) {
      if constexpr (STAGED) {
        return s_dz[g - lo];
      } else {
        return head_dzs_at(a, g);
      }
    };

    // 1. du, dv at this thread's position: the taps' transpose, source q = p - t + k/2.
    const int64_t o = c0 + tid;
    if (o < total) {
      const int64_t n = o / a.S;
      const int p = static_cast<int>(o - n * a.S);  // S < 2^31 (launcher)
      const int x0 = p % a.W, y0 = (p / a.W) % a.H, z0 = p / (a.W * a.H);
      const int64_t base = n * a.S;
      acc_t dmap0 = acc_t(0), dmap1 = acc_t(0);  // (named, not an array: c is not constant)
      int t = 0;
      for (int c = 0; c < a.cin; ++c) {
        for (int tz = 0; tz < a.kd; ++tz) {
          const int zz = z0 - tz + rd;
          const bool z_in = zz >= 0 && zz < a.D;
          for (int ty = 0; ty < a.kh; ++ty, t += a.kw) {
            const int yy = y0 - ty + rh;
            if (!z_in || yy < 0 || yy >= a.H) continue;
            // the taps of this row whose source is inside the map: x0 - tx + rw in [0, W)
            const int tx_lo = x0 + rw - a.W + 1 > 0 ? x0 + rw - a.W + 1 : 0;
            const int tx_hi = x0 + rw + 1 < a.kw ? x0 + rw + 1 : a.kw;
            const int64_t row = base + (static_cast<int64_t>(zz) * a.H + yy) * a.W + x0 + rw;
            acc_t acc = acc_t(0);
            for (int tx = tx_lo; tx < tx_hi; ++tx) acc += s_w[t + tx] * dzs_at(row - tx);
            if (c == 0) {
              dmap0 += acc;
            } else {
              dmap1 += acc;
            }
          }
        }
      }
      dmap0 *= bn.scale;  // dzconv = dzs scale: the sums are linear in it
      dmap1 *= bn.scale;
      if (a.order == 2) {
        const acc_t half = acc_t(0.5) * dmap0;
        st(a.du + o, half);
        st(a.dv + o, half);
      } else {
        st(a.du + o, a.order == 0 ? dmap1 : dmap0);
        st(a.dv + o, a.order == 0 ? dmap0 : dmap1);
      }
    }

    // 2. The chunk's part of this thread's slots, over its run of positions, row by row of the
    // map: the coordinates of the run's first position, then each next row's by carrying (no
    // division per row).
    const int end = total - c0 < run_hi ? static_cast<int>(total - c0) : run_hi;
    int64_t n0 = 0;
    int x0 = 0, y0 = 0, z0 = 0;
    if (run_lo < end) {
      n0 = (c0 + run_lo) / a.S;
      const int p = static_cast<int>(c0 + run_lo - n0 * a.S);
      x0 = p % a.W, y0 = (p / a.W) % a.H, z0 = p / (a.W * a.H);
    }
    CBAM_UNROLL  // part[] stays in registers
    for (int r = 0; r < kMaxHeadSlotsPerThread; ++r) {
      if (r >= nslots) break;
      const int j = slot(r);
      acc_t acc = acc_t(0);
      if (j >= taps) {  // db (times scale, below), dbn_w, dbn_b: sums over the run
        const acc_t* vals = s_own + (j == taps + 1 ? nthreads : 0);
        for (int i = run_lo; i < end; ++i) acc += vals[i];
      } else {  // weight j = (c, tz, ty, tx): sum over q of dzs[q] map[c, q + t - k/2]
        const int tx = j % a.kw, ty = (j / a.kw) % a.kh, tz = (j / (a.kw * a.kh)) % a.kd;
        const int c = j / (a.kw * a.kh * a.kd);
        int64_t n = n0;
        int x = x0, y = y0, z = z0;
        for (int i = run_lo; i < end;) {  // one row of the map at a time
          const int run = end - i < a.W - x ? end - i : a.W - x;  // positions left in this row
          const int zz = z + tz - rd, yy = y + ty - rh;
          if (zz >= 0 && zz < a.D && yy >= 0 && yy < a.H) {
            // positions x + e of the row whose tap lands inside: x + e + tx - rw in [0, W)
            const int e_lo = rw - tx - x > 0 ? rw - tx - x : 0;
            const int e_hi = a.W - x - tx + rw < run ? a.W - x - tx + rw : run;
            const int64_t src = (static_cast<int64_t>(zz) * a.H + yy) * a.W + x + tx - rw;
            if constexpr (STAGED) {
              const acc_t* m = s_map + c * span + (n * a.S + src - lo);
              for (int e = e_lo; e < e_hi; ++e) acc += s_own[i + e] * m[e];
            } else {
              const acc_t* m = a.smap + (n * a.cin + c) * a.S + src;
              for (int e = e_lo; e < e_hi; ++e) acc += s_own[i + e] * ld(m + e);
            }
          }
          i += run;
          x = 0;  // the next row
          if (++y == a.H) {
            y = 0;
            if (++z == a.D) {
              z = 0;
              ++n;
            }
          }
        }
      }
      part[r] += acc;
    }
  }
  const int64_t P = static_cast<int64_t>(gridDim.x) * G;
  CBAM_UNROLL
  for (int r = 0; r < kMaxHeadSlotsPerThread; ++r) {
    if (r >= nslots) break;
    const int j = slot(r);
    st(a.partials + j * P + static_cast<int64_t>(blockIdx.x) * G + group,
       j <= taps ? part[r] * bn.scale : part[r]);  // the weights and db: sums of dzconv
  }
}

// out[l] = the sum of partials[l, 0 .. P-1]: each thread folds p = tid, tid + blockDim.x, ... in
// order, then a halving tree in shared memory (blockDim.x a power of two). A block per slot l
// (grid-stride over L); slot l goes to dw[l] (l < taps), then db, dbn_w, dbn_b (nullptr: not
// asked for).
template <typename acc_t>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    spatial_head_backward_combine_kernel(const acc_t* partials, int64_t P, int L, int taps,
                                         acc_t* dw, acc_t* db, acc_t* dbn_w, acc_t* dbn_b) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ acc_t s_sum[kBlockThreads];
  const int tid = threadIdx.x;
  for (int l = blockIdx.x; l < L; l += gridDim.x) {
    acc_t acc = acc_t(0);
    for (int64_t p = tid; p < P; p += blockDim.x) acc += ld(partials + l * P + p);
    s_sum[tid] = acc;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h /= 2) {
      if (tid < h) s_sum[tid] += s_sum[tid + h];
      __syncthreads();
    }
    acc_t* dest = l < taps ? dw + l : l == taps ? db : l == taps + 1 ? dbn_w : dbn_b;
    if (tid == 0 && dest != nullptr) st(dest, s_sum[0]);
    __syncthreads();  // s_sum[0] read before the next slot overwrites it
  }
}

}  // namespace cbam
