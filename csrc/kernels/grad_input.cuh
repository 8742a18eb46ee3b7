// Q3 of the backward: dx written once, from g and the small tensors (csrc/ops.cpp, grad_input):
//
//   dx = g gc gs + kc (da/S + dm [s == is]) + ks (du/C + dv [c == ic])
//   arrangement 0 (channel first): kc = 1, ks = gc; 1 (spatial first): kc = gs, ks = 1;
//   2 (parallel): kc = ks = 1. Missing gates are 1, missing gradients 0.
//
// Pass: reads g once, writes dx once. g and dx viewed as [N, R, K] (common.cuh). The values of
// one channel (gc, da/S, dm, is) and of one spatial position (gs, du/C, dv, ic) form a Side; the
// sides along k are staged once per tile (stage_k_side) and held in registers per thread, the
// sides along r are staged in shared memory per chunk of rows. `cl`: k is the channel axis
// (channels-last). Requires VEC == 1 or K % VEC == 0.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

template <typename acc_t>
struct GradSide {
  acc_t gate;   // gc or gs
  acc_t dmean;  // da/S or du/C
  acc_t dmax;   // dm or dv
  int64_t idx;  // is (a spatial index) or ic (a channel index)
};

// Pointers of one side, [N, ext] each or nullptr.
template <typename acc_t>
struct GradSidePtrs {
  const acc_t* gate;
  const acc_t* dmean;
  const acc_t* dmax;
  const int64_t* idx;  // read only with dmax
  int64_t ext;
  acc_t div;  // the divisor of dmean (the extent the forward mean pooled over)

  CBAM_DEVICE GradSide<acc_t> load(int64_t n, int64_t i) const {
    GradSide<acc_t> s;
    const int64_t o = n * ext + i;
    s.gate = gate != nullptr ? ld(gate + o) : acc_t(1);
    s.dmean = dmean != nullptr ? ld(dmean + o) / div : acc_t(0);
    s.dmax = dmax != nullptr ? ld(dmax + o) : acc_t(0);
    s.idx = dmax != nullptr ? ld(idx + o) : int64_t(-1);
    return s;
  }
};

template <typename acc_t>
CBAM_DEVICE acc_t grad_input_value(acc_t gv, const GradSide<acc_t>& cs, const GradSide<acc_t>& ss,
                                   int64_t c, int64_t s, int arrangement) {
  const acc_t term_c = cs.dmean + (s == cs.idx ? cs.dmax : acc_t(0));
  const acc_t term_s = ss.dmean + (c == ss.idx ? ss.dmax : acc_t(0));
  const acc_t kc = arrangement == 1 ? ss.gate : acc_t(1);
  const acc_t ks = arrangement == 0 ? cs.gate : acc_t(1);
  return gv * cs.gate * ss.gate + kc * term_c + ks * term_s;
}

// At most 64 registers (4 blocks of 256 threads per SM): with 8-wide vectors the sides held in
// registers would otherwise take ~125 and leave too few loads in flight.
template <typename T, int VEC, int U, typename acc_t>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads, 4)
    grad_input_kernel(const T* __restrict__ grad, T* __restrict__ dx, GradSidePtrs<acc_t> side_r,
                      GradSidePtrs<acc_t> side_k, Geom g, bool cl, int arrangement) {
  __shared__ GradSide<acc_t> s_side[kChunkRows];
  const TileId t = tile_id(g, VEC);
  const bool active = t.k0 < g.K;
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = threadIdx.y * TX + threadIdx.x;

  __shared__ GradSide<acc_t> s_k[32 * VEC];
  GradSide<acc_t> sk[VEC];
  stage_k_side<VEC>(s_k, t, [&](int64_t k) { return side_k.load(t.n, k); }, sk);

  for (int64_t cb = t.r_begin; cb < t.r_end; cb += kChunkRows) {
    const int64_t rest = t.r_end - cb;
    const int clen = rest < kChunkRows ? static_cast<int>(rest) : kChunkRows;
    __syncthreads();
    for (int i = tid; i < clen; i += TX * TY) s_side[i] = side_r.load(t.n, cb + i);
    __syncthreads();
    if (!active) continue;
    for (int i0 = threadIdx.y; i0 < clen; i0 += U * TY) {
      acc_t v_[U][VEC] = {};
      for (int u = 0; u < U; ++u) {  // loads first: U rows in flight
        const int i = i0 + u * TY;
        if (i < clen) load_acc<VEC>(grad + (t.n * g.R + cb + i) * g.K + t.k0, v_[u]);
      }
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * TY;
        if (i >= clen) break;
        const int64_t r = cb + i;
        const GradSide<acc_t> sr = s_side[i];
        for (int v = 0; v < VEC; ++v) {
          const int64_t k = t.k0 + v;
          v_[u][v] = cl ? grad_input_value(v_[u][v], sk[v], sr, k, r, arrangement)
                        : grad_input_value(v_[u][v], sr, sk[v], r, k, arrangement);
        }
        store_from_acc<VEC>(dx + (t.n * g.R + r) * g.K + t.k0, v_[u]);
      }
    }
  }
}

}  // namespace cbam
