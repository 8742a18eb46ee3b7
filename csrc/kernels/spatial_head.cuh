// The spatial gate's head in one kernel: the map stacked from the pools over C, its convolution
// (one output channel, odd k in every dimension, zero padding k/2, stride 1), the spatial
// BatchNorm in eval mode and the sigmoid (csrc/ops.cpp, spatial_head; DESIGN.md section 1):
//
//   map[n, c, p]  = (v, u)[c] ("max,mean"), (u, v)[c] ("mean,max"), 0.5 (u + v) ("blend", c = 0)
//   zconv[n, p]   = sum over c, then the taps t in row-major order, of
//                   w[c, t] map[n, c, p + t - k/2] (0 outside the map), + b
//   gs[n, p]      = sigmoid(zs),  zs = (zconv - rm) invstd bn_w + bn_b, invstd = 1 / sqrt(rv + eps)
//                   (zs = zconv without BatchNorm)
//
// Pass: one thread per output position, a block per chunk of blockDim.x consecutive positions of
// the flattened [N, S] (a grid-stride loop over the chunks; blockDim.x is 64, 128 or 256, the
// launcher's choice: launchers/spatial_head_common.h head_block_threads). STAGED: the block first
// stages the map over its chunk plus `reach` positions either side (the largest flat distance of a
// tap, rd H W + rh W + rw) in shared memory, cin values each, computed once from u and v; every
// tap then reads shared memory, so u and v are read (blockDim.x + 2 reach) / blockDim.x times
// over, not cin k^d times (the launcher takes it where the span fits kMaxHeadStageBytes).
// Otherwise each tap reads u and v in global memory (L1 / L2 hits). Taps outside the map, by
// coordinates, are skipped, so a chunk that spans two samples never mixes them. Each thread writes
// map, zconv and (with `gate`) gs at its own position. The cin k^d weights are staged in shared
// memory once per block. Replaces the ATen cat, convolution, batch_norm and sigmoid (four to five
// launches) with one.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

constexpr int kMaxHeadTaps = 1024;             // cin k^d weights staged per block (acc_t)
constexpr int kMaxHeadStageBytes = 32 * 1024;  // the staged map of a chunk (dynamic shared memory)

// The geometry both head kernels (forward and backward) share: the maps [N, cin, *spatial] and
// the kernel (launchers/spatial_head_common.h set_head_geom fills it).
struct HeadGeom {
  int64_t N, S;
  int D, H, W;     // the spatial extents, 1 for absent leading dimensions
  int kd, kh, kw;  // kernel extents (1 along absent dimensions)
  int cin;         // 2, or 1 for the blend
  int order;       // 0: "max,mean", 1: "mean,max", 2: "blend"
  int64_t reach;   // the largest flat distance of a tap: (kd / 2) H W + (kh / 2) W + kw / 2
};

template <typename acc_t>
struct SpatialHeadArgs : HeadGeom {
  const acc_t* u;     // [N, S] mean over C
  const acc_t* v;     // [N, S] max over C
  const acc_t* w;     // [1, cin, k...] contiguous: cin * kd * kh * kw weights
  const acc_t* bias;  // [1] or nullptr
  // BatchNorm (eval) of the conv output: all four [1] or all nullptr (bn_w, bn_b may be nullptr
  // alone: affine=False)
  const acc_t* bn_w;
  const acc_t* bn_b;
  const acc_t* bn_rm;
  const acc_t* bn_rv;
  acc_t bn_eps;
  acc_t* gs;     // [N, S] or nullptr (no gate: the caller normalizes zconv itself)
  acc_t* smap;   // [N, cin, S]
  acc_t* zconv;  // [N, S]
};

// Channel c of the map at offset o of [N, S].
template <typename acc_t>
CBAM_DEVICE acc_t head_map_at(const SpatialHeadArgs<acc_t>& a, int c, int64_t o) {
  if (a.order == 2) return acc_t(0.5) * (ld(a.u + o) + ld(a.v + o));
  return (c == 0) == (a.order == 0) ? ld(a.v + o) : ld(a.u + o);
}

template <typename acc_t, bool STAGED>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads) spatial_head_kernel(SpatialHeadArgs<acc_t> a) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ acc_t s_w[kMaxHeadTaps];
  CBAM_DYNAMIC_SMEM(acc_t, s_map);  // STAGED: [cin][span], the map over a chunk and its reach
  const int taps = a.cin * a.kd * a.kh * a.kw;
  for (int i = threadIdx.x; i < taps; i += blockDim.x) s_w[i] = ld(a.w + i);

  const int rd = a.kd / 2, rh = a.kh / 2, rw = a.kw / 2;
  const acc_t bias = a.bias != nullptr ? ld(a.bias) : acc_t(0);
  acc_t bn_mean = acc_t(0), bn_invstd = acc_t(1), bn_scale = acc_t(1), bn_shift = acc_t(0);
  const bool bn = a.bn_rv != nullptr;
  if (bn) {
    bn_mean = ld(a.bn_rm);
    bn_invstd = acc_t(1) / sqrt_acc(ld(a.bn_rv) + a.bn_eps);
    if (a.bn_w != nullptr) bn_scale = ld(a.bn_w);
    if (a.bn_b != nullptr) bn_shift = ld(a.bn_b);
  }
  const int64_t total = a.N * a.S;
  const int64_t span = blockDim.x + 2 * a.reach;
  // chunk starts: the same for every thread of the block (the barriers below are uniform)
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * blockDim.x; c0 < total;
       c0 += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t lo = c0 - a.reach;  // flat position of s_map[c][0]
    __syncthreads();  // (the weights; the previous chunk's map is no longer read)
    if constexpr (STAGED) {
      for (int64_t i = threadIdx.x; i < span; i += blockDim.x) {
        const int64_t g = lo + i;
        if (g < 0 || g >= total) continue;  // never read: outside the map by coordinates
        for (int c = 0; c < a.cin; ++c) s_map[c * span + i] = head_map_at(a, c, g);
      }
      __syncthreads();
    }
    const int64_t o = c0 + threadIdx.x;
    if (o >= total) continue;
    const auto map_at = [&](int c, int64_t g) {
      if constexpr (STAGED) {
        return s_map[c * span + (g - lo)];
      } else {
        return head_map_at(a, c, g);
      }
    };
    const int64_t n = o / a.S;
    const int p = static_cast<int>(o - n * a.S);  // S < 2^31 (launcher)
    const int x0 = p % a.W, y0 = (p / a.W) % a.H, z0 = p / (a.W * a.H);
    const int64_t base = n * a.S;
    acc_t acc = acc_t(0);
    int t = 0;
    for (int c = 0; c < a.cin; ++c) {
      for (int dz = 0; dz < a.kd; ++dz) {
        const int zz = z0 + dz - rd;
        const bool z_in = zz >= 0 && zz < a.D;
        for (int dy = 0; dy < a.kh; ++dy, t += a.kw) {
          const int yy = y0 + dy - rh;
          if (!z_in || yy < 0 || yy >= a.H) continue;
          // the taps of this row inside the map: x0 + dx - rw in [0, W)
          const int dx_lo = rw > x0 ? rw - x0 : 0;
          const int dx_hi = a.W - x0 + rw < a.kw ? a.W - x0 + rw : a.kw;
          const int64_t row = base + (static_cast<int64_t>(zz) * a.H + yy) * a.W + x0 - rw;
          for (int dx = dx_lo; dx < dx_hi; ++dx) acc += s_w[t + dx] * map_at(c, row + dx);
        }
      }
    }
    acc += bias;
    st(a.zconv + o, acc);
    for (int c = 0; c < a.cin; ++c) st(a.smap + (n * a.cin + c) * a.S + p, map_at(c, o));
    if (a.gs != nullptr) {
      const acc_t z = bn ? (acc - bn_mean) * bn_invstd * bn_scale + bn_shift : acc;
      st(a.gs + o, acc_t(1) / (acc_t(1) + exp_acc(-z)));
    }
  }
}

}  // namespace cbam
