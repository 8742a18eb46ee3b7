// Q3 of the backward: dx written once, from g and the small tensors (csrc/ops.cpp, grad_input):
//
//   dx = g gc gs + kc (da/S + dm [s == is]) + ks (du/C + dv [c == ic])
//   arrangement 0 (channel first): kc = 1, ks = gc; 1 (spatial first): kc = gs, ks = 1;
//   2 (parallel): kc = ks = 1. Missing gates are 1, missing gradients 0.
// With LPLSE (grad_input_lp_lse: the official code's lp and lse pools over S also fed the channel
// head) the pool-over-S term gains their gradients, which need x:
//   da/S + dm [s == is]  +  (dlp / lp) v + dlse exp(v - lse),   v = x (arrangement 1: x gs)
// (d sqrt(sum v^2) / dv = v / lp; d (M + log sum exp(v - M)) / dv = exp(v - lse)).
//
// Pass: reads g once (and x once with LPLSE), writes dx once. g and dx viewed as [N, R, K]
// (common.cuh). The values of one channel (gc, da/S, dm, is, and the lp / lse values) and of one
// spatial position (gs, du/C, dv, ic) form a Side; the sides along k are staged once per tile
// (stage_k_side) and held in registers per thread, the sides along r are staged in shared memory
// per chunk of rows. `cl`: k is the channel axis (channels-last). Requires VEC == 1 or
// K % VEC == 0.
#pragma once

#include <type_traits>

#include "kernels/common.cuh"

namespace cbam {

template <typename acc_t>
struct GradSideBase {
  acc_t gate;   // gc or gs
  acc_t dmean;  // da/S or du/C
  acc_t dmax;   // dm or dv
  int idx;      // is (a spatial index) or ic (a channel index): < 2^31, checked by the launcher
};
template <typename acc_t>
struct GradSideLpLse : GradSideBase<acc_t> {
  acc_t dlp;   // dlp / lp
  acc_t dlse;  // dlse
  acc_t lse;   // lse
};
template <typename acc_t, bool LPLSE>
using GradSide = std::conditional_t<LPLSE, GradSideLpLse<acc_t>, GradSideBase<acc_t>>;

// Pointers of one side, [N, ext] each or nullptr.
template <typename acc_t>
struct GradSidePtrs {
  const acc_t* gate;
  const acc_t* dmean;
  const acc_t* dmax;
  const int64_t* idx;  // read only with dmax
  int64_t ext;
  acc_t div;  // the divisor of dmean (the extent the forward mean pooled over)
  // the lp / lse pools' values and gradients (the channel side of grad_input_lp_lse only)
  const acc_t* dlp = nullptr;
  const acc_t* lp = nullptr;  // read only with dlp
  const acc_t* dlse = nullptr;
  const acc_t* lse = nullptr;  // read only with dlse

  template <bool LPLSE>
  CBAM_DEVICE GradSide<acc_t, LPLSE> load(int64_t n, int64_t i) const {
    GradSide<acc_t, LPLSE> s;
    const int64_t o = n * ext + i;
    s.gate = gate != nullptr ? ld(gate + o) : acc_t(1);
    s.dmean = dmean != nullptr ? ld(dmean + o) / div : acc_t(0);
    s.dmax = dmax != nullptr ? ld(dmax + o) : acc_t(0);
    s.idx = dmax != nullptr ? static_cast<int>(ld(idx + o)) : -1;
    if constexpr (LPLSE) {
      s.dlp = dlp != nullptr ? ld(dlp + o) / ld(lp + o) : acc_t(0);
      s.dlse = dlse != nullptr ? ld(dlse + o) : acc_t(0);
      s.lse = dlse != nullptr ? ld(lse + o) : acc_t(0);
    }
    return s;
  }
};

// dx of one element: gv = g, xv = x (read only with LPLSE), cs / ss the channel / spatial side;
// hit_c = [s == is] (this element is its channel's max), hit_s = [c == ic].
template <typename acc_t, bool LPLSE>
CBAM_DEVICE acc_t grad_input_value(acc_t gv, acc_t xv, const GradSide<acc_t, LPLSE>& cs,
                                   const GradSide<acc_t, LPLSE>& ss, bool hit_c, bool hit_s,
                                   int arrangement) {
  acc_t term_c = cs.dmean + (hit_c ? cs.dmax : acc_t(0));
  if constexpr (LPLSE) {
    const acc_t v = arrangement == 1 ? xv * ss.gate : xv;  // what the pools over S saw
    term_c += cs.dlp * v;
    if (cs.dlse != acc_t(0)) term_c += cs.dlse * exp_acc(v - cs.lse);
  }
  const acc_t term_s = ss.dmean + (hit_s ? ss.dmax : acc_t(0));
  const acc_t kc = arrangement == 1 ? ss.gate : acc_t(1);
  const acc_t ks = arrangement == 0 ? cs.gate : acc_t(1);
  return gv * cs.gate * ss.gate + kc * term_c + ks * term_s;
}

// Registers: at most 64 a thread (4 blocks of 256 threads per SM), 80 with U = 2 (3 blocks: its
// second row of vectors needs them). With 8-wide vectors the sides held in registers would take
// ~125 and leave too few loads in flight, so registers hold only what every element of a k side
// uses (gate, dmean, a 32-bit idx); the lp / lse sides are larger still, and that variant reads
// its k sides from shared memory where it uses them (kSidesInRegs). ptxas -v (sm_90): no spills
// and no local arrays on the float32 and 16-bit paths at U = 1 and 2 (before: 36 to 96 bytes a
// thread on the 16-bit one); 8 bytes for float64 at U = 1; none for the lp / lse variant with
// 16-bit types since its k sides are staged lane-fastest (before: 12 / 28 bytes, and 236 / 312
// before that). tests/test_codegen.py holds these.
template <typename T, int VEC, int U, bool LPLSE, typename acc_t>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads, U == 2 ? 3 : 4)
    grad_input_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ dx,
                      GradSidePtrs<acc_t> side_r, GradSidePtrs<acc_t> side_k, Geom g, bool cl,
                      int arrangement) {
  using Side = GradSide<acc_t, LPLSE>;
  __shared__ Side s_side[kChunkRows];
  const TileId t = tile_id(g, VEC);
  const bool active = t.k0 < g.K;
  const int k0 = static_cast<int>(t.k0);
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = threadIdx.y * TX + threadIdx.x;

  // The k sides: staged in shared memory; without lp / lse, the values every element uses (gate,
  // dmean, idx) are also held in registers, and dmax (used at the argmax row only) is read from
  // shared memory there.
  constexpr bool kSidesInRegs = !LPLSE;
  constexpr int KR = kSidesInRegs ? VEC : 1;
  __shared__ Side s_k[32 * VEC];
  // (lane-fastest where every element reads them: the lp / lse variant)
  stage_k_side<VEC, LPLSE>(s_k, t, [&](int64_t k) { return side_k.template load<LPLSE>(t.n, k); });
  acc_t k_gate[KR], k_dmean[KR];
  int k_idx[KR];
  if constexpr (kSidesInRegs) {
    for (int v = 0; v < VEC; ++v) {  // (unused where k >= K)
      const Side& sv = s_k[k_slot<VEC, LPLSE>(0, v)];
      k_gate[v] = sv.gate;
      k_dmean[v] = sv.dmean;
      k_idx[v] = sv.idx;
    }
  }

  for (int64_t cb = t.r_begin; cb < t.r_end; cb += kChunkRows) {
    const int64_t rest = t.r_end - cb;
    const int clen = rest < kChunkRows ? static_cast<int>(rest) : kChunkRows;
    __syncthreads();
    for (int i = tid; i < clen; i += TX * TY) s_side[i] = side_r.template load<LPLSE>(t.n, cb + i);
    __syncthreads();
    if (!active) continue;
    const int64_t chunk0 = (t.n * g.R + cb) * g.K + t.k0;  // offset of the chunk's first row
    for (int i0 = threadIdx.y; i0 < clen; i0 += U * TY) {
      acc_t v_[U][VEC] = {};
      acc_t xv[LPLSE ? U : 1][VEC] = {};
      // (guards, not breaks: the u loops unroll and v_ stays in registers)
      int64_t off[U];  // of row i0 + u * TY: loaded from, then stored to
      CBAM_UNROLL
      for (int u = 0; u < U; ++u) {  // loads first: U rows in flight
        const int i = i0 + u * TY;
        off[u] = chunk0 + static_cast<int64_t>(i) * g.K;
        if (i < clen) {
          load_acc<VEC>(grad + off[u], v_[u]);
          if constexpr (LPLSE) load_acc<VEC>(x + off[u], xv[u]);
        }
      }
      CBAM_UNROLL
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * TY;
        if (i >= clen) continue;
        const int r = static_cast<int>(cb) + i;  // indices in 32 bits: R, K < 2^31 (launcher)
        const Side sr = s_side[i];
        for (int v = 0; v < VEC; ++v) {
          const acc_t xe = LPLSE ? xv[LPLSE ? u : 0][v] : acc_t(0);
          const acc_t gv = v_[u][v];
          // the max indicators: the r side's idx is a column, the k side's a row
          const bool hit_r = sr.idx == k0 + v;
          const auto value = [&](const Side& skv, bool hit_k) {
            return cl ? grad_input_value<acc_t, LPLSE>(gv, xe, skv, sr, hit_k, hit_r, arrangement)
                      : grad_input_value<acc_t, LPLSE>(gv, xe, sr, skv, hit_r, hit_k, arrangement);
          };
          if constexpr (kSidesInRegs) {
            const int w = kSidesInRegs ? v : 0;
            const bool hit_k = r == k_idx[w];
            Side skv;
            skv.gate = k_gate[w];
            skv.dmean = k_dmean[w];
            skv.idx = k_idx[w];
            skv.dmax = hit_k ? s_k[k_slot<VEC, LPLSE>(0, v)].dmax : acc_t(0);
            v_[u][v] = value(skv, hit_k);
          } else {
            const Side& skv = s_k[k_slot<VEC, LPLSE>(0, v)];
            v_[u][v] = value(skv, r == skv.idx);
          }
        }
        store_from_acc<VEC>(dx + off[u], v_[u]);
      }
    }
  }
}

}  // namespace cbam
