// Q3 of the backward: dx written once, from g and the small tensors (csrc/ops.cpp, grad_input):
//
//   dx = g gc gs + kc (da/S + dm [s == is]) + ks (du/C + dv [c == ic])
//   arrangement 0 (channel first): kc = 1, ks = gc; 1 (spatial first): kc = gs, ks = 1;
//   2 (parallel): kc = ks = 1. Missing gates are 1, missing gradients 0. Computed in one of
//   three forms of two or three FMAs an element (grad_input_combine, below).
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
// FOLD: rows folded G at a time (Fold, common.cuh; the vector path of rows of K0 % VEC != 0).
// A thread's VEC columns then belong to original rows r G + j and columns k (FoldPos),
// fixed for the thread: the tile's k sides are staged once per original column
// (stage_k_side_folded, padded column order) and used as above, the r sides are staged G per
// folded row and those of the (at most two) rows of a thread's columns selected per element.
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

// The form of dx that the arrangement takes, by which side runs along r (R) and which along k
// (K), with T a side's term (dmean, dmean + dmax at its max):
//   0: gR (g gK + TK) + TR     channel first, channels-first; spatial first, channels-last
//   1: gK (g gR + TR) + TK     channel first, channels-last; spatial first, channels-first
//   2: gR (g gK) + (TR + TK)   parallel
// (from g gc gs + kc Tc + ks Ts: channel first gc (g gs + Ts) + Tc, spatial first
// gs (g gc + Tc) + Ts). Two FMAs an element, three for the parallel form.
CBAM_HOST_DEVICE constexpr int grad_input_mode(bool cl, int arrangement) {
  return arrangement == 2 ? 2 : (arrangement == 0) != cl ? 0 : 1;
}
constexpr int kAnyMode = -1;  // (the kernels of lp / lse and of 16-bit folded rows)

// Whether an instance takes dx in a form (MODE): all but lp / lse and 16-bit folded rows, the
// instances that hold their k sides in registers.
template <bool LPLSE, bool FOLD, int VEC>
constexpr bool grad_input_takes_forms() {
  return !LPLSE && !(FOLD && VEC == 8);
}

template <int MODE, typename acc_t>
CBAM_DEVICE acc_t grad_input_combine(acc_t gv, acc_t gR, acc_t gK, acc_t TR, acc_t TK) {
  static_assert(MODE >= 0 && MODE <= 2, "a form of dx");
  if constexpr (MODE == 0) {
    return gR * (gv * gK + TK) + TR;
  } else if constexpr (MODE == 1) {
    return gK * (gv * gR + TR) + TK;
  } else {
    return gR * (gv * gK) + (TR + TK);
  }
}

// The instances that hold their k sides in registers (kFast, grad_input_takes_forms: all but
// lp / lse and 16-bit folded rows) take dx in the form MODE, a template parameter
// (grad_input_combine): per element a select of each side's term and two FMAs, with no select
// of the arrangement or the layout. The hot loop (SASS, sm_90): 87 instructions a 16-bit vector
// of 8 (about 150 before, 19 an element), 47 a float32 vector of 4 (about 80); float32 folded
// rows (7x7 channels-first) 74 at U = 1 and 180 at U = 2 (static counts of 204 and 430 before).
// lp / lse and 16-bit folded rows (MODE = kAnyMode) keep grad_input_value per element: in the
// forms, ptxas spilled their 16-bit instances (up to 316 bytes); and one kernel holding all
// three forms spilled the 16-bit whole rows too.
// Registers: at most 64 a thread (4 blocks of 256 threads per SM), 80 with U = 2 (3 blocks: its
// second row of vectors needs them). With 8-wide vectors the sides held in registers would take
// ~125 and leave too few loads in flight, so registers hold only what every element of a k side
// uses (gate, dmean, a 32-bit idx, and dmean + dmax, which the select takes at the max row);
// the lp / lse sides are larger still, and that variant reads its k sides from shared
// memory where it uses them (not kFast). ptxas -v (sm_90): no spills and no local arrays on
// the float32 and 16-bit paths at U = 1 and 2 (before: 36 to 96 bytes a thread on the 16-bit
// one); 8 bytes for float64 at U = 1; none for the lp / lse variant with 16-bit types since its
// k sides are staged lane-fastest (before: 12 / 28 bytes, and 236 / 312 before that). Folded
// rows (FOLD) add the position of each column and the r sides of two rows: the 16-bit instances
// get 80 registers (3 blocks) and read their k sides from shared memory too, from the padded
// column order of stage_k_side_folded (no bank conflicts); held in registers they spilled 24 to
// 72 bytes. They still spill 8 (U = 1) and 24 bytes (U = 2) at 80 (the 16-bit channels-first
// maps of odd size only; float32 none, float64 8 bytes at U = 1 as on whole rows).
// tests/test_codegen.py holds these.
template <typename T, int VEC, int U, bool LPLSE, bool FOLD, int MODE, typename acc_t>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads, U == 2 || (FOLD && VEC == 8) ? 3 : 4)
    grad_input_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ dx,
                      GradSidePtrs<acc_t> side_r, GradSidePtrs<acc_t> side_k, Geom g, Fold f,
                      bool cl, int arrangement) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  using Side = GradSide<acc_t, LPLSE>;
  constexpr bool kFast = grad_input_takes_forms<LPLSE, FOLD, VEC>();
  static_assert(kFast == (MODE != kAnyMode), "a form of dx where the k sides are in registers");
  __shared__ Side s_side[kChunkRows];
  const TileId t = tile_id(g, VEC);
  const bool active = t.k0 < g.K;
  const int k0 = static_cast<int>(t.k0);
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = threadIdx.y * TX + threadIdx.x;
  const int G = FOLD ? f.G : 1;
  const int K0 = FOLD ? f.K0 : static_cast<int>(g.K);
  const FoldPos p0 = fold_pos(k0, FOLD ? K0 : 1);  // the thread's column 0 (FOLD)

  // The k sides: staged in shared memory; for kFast, the values the elements use (gate, dmean,
  // dmean + dmax, idx) are also held in registers.
  constexpr int KR = kFast ? VEC : 1;
  __shared__ Side s_k[FOLD ? kFoldedSlots<VEC> : kMaxSpanCols * VEC];
  const auto load_k = [&](int64_t k) { return side_k.template load<LPLSE>(t.n, k); };
  if constexpr (FOLD) {
    stage_k_side_folded<VEC>(s_k, t, K0, load_k);
  } else {  // (lane-fastest where every element reads them: the lp / lse variant)
    stage_k_side<VEC, LPLSE>(s_k, t, load_k);
  }
  // the slot of the k side of the thread's column v (whose original column is k)
  const auto k_side_slot = [&](int v, int k) {
    return FOLD ? folded_slot<VEC>(k, t, K0) : k_slot<VEC, LPLSE>(0, v);
  };
  acc_t k_gate[KR] = {}, k_dmean[KR] = {};  // (left 0 in the threads past the row's end)
  acc_t k_dhit[KR] = {};                     // dmean + dmax
  int k_idx[KR] = {};
  if constexpr (kFast) {
    FoldPos p = p0;
    for (int v = 0; v < VEC; ++v) {
      if (active) {
        const Side& sv = s_k[k_side_slot(v, FOLD ? p.k : k0 + v)];
        k_gate[v] = sv.gate;
        k_dmean[v] = sv.dmean;
        k_dhit[v] = sv.dmean + sv.dmax;
        k_idx[v] = sv.idx;
      }
      if constexpr (FOLD) fold_next(p, K0);
    }
  }

  const int crows = kChunkRows / G;  // (folded) rows of one chunk of staged r sides
  for (int64_t cb = t.r_begin; cb < t.r_end; cb += crows) {
    const int64_t rest = t.r_end - cb;
    const int clen = rest < crows ? static_cast<int>(rest) : crows;
    __syncthreads();
    for (int i = tid; i < clen * G; i += TX * TY) {
      s_side[i] = side_r.template load<LPLSE>(t.n, cb * G + i);
    }
    __syncthreads();
    if (!active) continue;
    const int64_t chunk0 = (t.n * g.R + cb) * g.K + t.k0;  // offset of the chunk's first row
    for (int i0 = threadIdx.y; i0 < clen; i0 += U * TY) {
      acc_t v_[U][VEC] = {};
      acc_t xv[LPLSE ? U : 1][VEC] = {};
      // (guards, not breaks: the u loops unroll and v_ stays in registers)
      int64_t off[U];  // of row i0 + u * TY: loaded from, then stored to
      CBAM_UNROLL
      for (int u = 0; u < U; ++u) off[u] = chunk0 + static_cast<int64_t>(i0 + u * TY) * g.K;
      // Loads first, U rows in flight (load_raw): unguarded where all U > 1 rows are in the
      // chunk, guarded otherwise.
      if (U > 1 && i0 + (U - 1) * TY < clen) {
        Vec<T, VEC> graw[U], xraw[LPLSE ? U : 1];
        CBAM_UNROLL
        for (int u = 0; u < U; ++u) {
          graw[u] = load_raw<VEC>(grad + off[u]);
          if constexpr (LPLSE) xraw[u] = load_raw<VEC>(x + off[u]);
        }
        CBAM_UNROLL
        for (int u = 0; u < U; ++u) {
          to_acc<VEC>(graw[u], v_[u]);
          if constexpr (LPLSE) to_acc<VEC>(xraw[u], xv[u]);
        }
      } else {
        CBAM_UNROLL
        for (int u = 0; u < U; ++u) {
          if (i0 + u * TY < clen) {
            load_acc<VEC>(grad + off[u], v_[u]);
            if constexpr (LPLSE) load_acc<VEC>(x + off[u], xv[u]);
          }
        }
      }
      CBAM_UNROLL
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * TY;
        if (i >= clen) continue;
        // indices in 32 bits: R, K < 2^31 (launcher; folded: R0 and K0)
        const int rf = static_cast<int>(cb) + i;
        if constexpr (kFast) {
          // the r sides of the (at most two, K0 >= VEC) original rows of the thread's columns
          // (FOLD; else one), selected per element; each one's term at its max, in the
          // thread's column v == vr (whole rows) or where its idx is the element's column
          const Side sr0 = s_side[FOLD ? i * G + p0.j : i];
          const Side sr1 = FOLD && p0.j + 1 < G ? s_side[i * G + p0.j + 1] : sr0;
          const acc_t hit0 = sr0.dmean + sr0.dmax, hit1 = sr1.dmean + sr1.dmax;
          const int vr = sr0.idx - k0;  // (idx -1: none)
          FoldPos p = p0;
          for (int v = 0; v < VEC; ++v) {
            const int r = FOLD ? rf * G + p.j : rf;  // the original row and column of the element
            const bool first = !FOLD || p.j == p0.j;
            const bool hit_r = FOLD ? (first ? sr0.idx : sr1.idx) == p.k : v == vr;
            if constexpr (FOLD) fold_next(p, K0);
            const acc_t gR = first ? sr0.gate : sr1.gate;
            const acc_t TR = hit_r ? (first ? hit0 : hit1) : first ? sr0.dmean : sr1.dmean;
            const acc_t TK = r == k_idx[v] ? k_dhit[v] : k_dmean[v];
            v_[u][v] = grad_input_combine<MODE>(v_[u][v], gR, k_gate[v], TR, TK);
          }
        } else {
          // the r sides of the (at most two, K0 >= VEC) original rows of the thread's columns,
          // selected per element (read per element, they took more registers)
          const Side sr0 = s_side[FOLD ? i * G + p0.j : i];
          const Side sr1 = FOLD && p0.j + 1 < G ? s_side[i * G + p0.j + 1] : sr0;
          FoldPos p = p0;
          for (int v = 0; v < VEC; ++v) {
            const int r = FOLD ? rf * G + p.j : rf;  // the original row and column of the element
            const int k = FOLD ? p.k : k0 + v;
            const Side sr = !FOLD || p.j == p0.j ? sr0 : sr1;
            if constexpr (FOLD) fold_next(p, K0);
            const acc_t xe = LPLSE ? xv[LPLSE ? u : 0][v] : acc_t(0);
            const acc_t gv = v_[u][v];
            // the max indicators: the r side's idx is a column, the k side's a row
            const bool hit_r = sr.idx == k;
            const Side& skv = s_k[k_side_slot(v, k)];
            const bool hit_k = r == skv.idx;
            v_[u][v] = cl ? grad_input_value<acc_t, LPLSE>(gv, xe, skv, sr, hit_k, hit_r,
                                                           arrangement)
                          : grad_input_value<acc_t, LPLSE>(gv, xe, sr, skv, hit_r, hit_k,
                                                           arrangement);
          }
        }
        store_from_acc<VEC>(dx + off[u], v_[u]);
      }
    }
  }
}

}  // namespace cbam
