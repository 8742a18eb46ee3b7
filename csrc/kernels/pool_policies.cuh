// What the two reduction templates (reduce_k.cuh, reduce_r.cuh) fold. A policy gives:
//   State                 the running fold of one output element, combine()d in a fixed tree order
//   kHasKept              whether the fold also needs a value of the kept index (kept(n, k),
//                         put into a State by set_kept; the templates load it once per output
//                         and tile and share it between the threads of that output)
//   Weight, weight(n, i)  the small per-element factor along the reduced axis (index i); an
//                         empty Weight is none (stages_weights, common.cuh: nothing staged)
//   add(state, x, w, i, kept)   fold one x element (reduced index i, kept index `kept`); the
//                         templates fold the elements of one state in increasing i
//   store_final / store_partial / load_partial   outputs [N, L] and partials [N, P, L]
#pragma once

#include <type_traits>

#include "kernels/common.cuh"

namespace cbam {

// The pools: v = x * scale[n, i] (SCALED; else v = x, a policy without weights: no staged
// weight loaded and no multiply an element, the first pool of every arrangement); avg = sum v / E,
// max = max v, argmax = first index of the max (NaN wins, first NaN).
// With LPLSE, also the official code's lp and lse pools (its ChannelGate pool_types 'lp', 'lse'):
//   lp  = sqrt(sum v^2)                   (F.lp_pool2d, norm 2, over the whole map)
//   lse = M + log(sum exp(v - M)), M = max v   (its logsumexp_2d)
// lse is folded online in the same pass: the state keeps e = sum exp(v - mx) relative to its
// running max and rescales e when the max grows (one exp per element). As in logsumexp_2d, lse
// is NaN when M is not finite (a NaN, +inf, or every v -inf).
template <typename acc_t_, bool LPLSE = false, bool SCALED = true>
struct PoolPolicy {
  using acc_t = acc_t_;
  const acc_t* scale;  // [N, E] along the reduced axis (SCALED only)
  int64_t E;           // reduced extent
  acc_t* avg;          // [N, L]
  acc_t* mx;           // [N, L]
  int64_t* arg;        // [N, L]
  acc_t* lp;           // [N, L] (LPLSE only)
  acc_t* lse;          // [N, L] (LPLSE only)
  acc_t* p_sum;        // partials [N, P, L] (only with P > 1)
  acc_t* p_max;
  int* p_arg;
  acc_t* p_sq;         // (LPLSE only)
  acc_t* p_exp;        // (LPLSE only)

  struct BaseState {
    acc_t sum;
    acc_t mx;
    int idx;
  };
  struct LpLseState : BaseState {
    acc_t sq;  // sum v^2
    acc_t e;   // sum exp(v - mx)
  };
  using State = std::conditional_t<LPLSE, LpLseState, BaseState>;
  static constexpr int kPartialBytes =
      (LPLSE ? 4 : 2) * static_cast<int>(sizeof(acc_t)) + static_cast<int>(sizeof(int));
  struct ScaleWeight {
    acc_t s;
  };
  struct NoWeight {};  // (the templates stage it as any weight: nothing to load or store)
  using Weight = std::conditional_t<SCALED, ScaleWeight, NoWeight>;

  CBAM_DEVICE State init() const {
    State s;
    s.sum = acc_t(0);
    s.mx = static_cast<acc_t>(-INFINITY);
    s.idx = kNoIndex;
    if constexpr (LPLSE) {
      s.sq = acc_t(0);
      s.e = acc_t(0);
    }
    return s;
  }
  static constexpr bool kHasKept = false;
  CBAM_DEVICE Weight weight(int64_t n, int64_t i) const {
    Weight w;
    // (scale is never null here; the check kept ptxas from recomputing reduce_r's chunk bound
    // in its row loop, 5 instructions a row)
    if constexpr (SCALED) w.s = scale != nullptr ? ld(scale + n * E + i) : acc_t(1);
    return w;
  }
  CBAM_DEVICE void add(State& s, acc_t xv, const Weight& w, int i, int64_t /*kept*/) const {
    acc_t v = xv;
    if constexpr (SCALED) v *= w.s;
    s.sum += v;
    if constexpr (LPLSE) {
      s.sq += v * v;
      if (v > s.mx) {  // a new max (s.mx is still the old one): rescale e to it
        s.e = s.e * exp_acc(s.mx - v) + acc_t(1);
      } else if (v > static_cast<acc_t>(-INFINITY)) {  // exp(-inf - mx) = 0 (and no -inf - -inf)
        s.e += exp_acc(v - s.mx);
      }
    }
    max_fold_next(s.mx, s.idx, v, i);  // the templates fold each thread's elements in order
  }
  // e relative to max m_from, rescaled to max m_to >= m_from (an empty e stays 0).
  static CBAM_DEVICE acc_t rebase(acc_t e, acc_t m_from, acc_t m_to) {
    return e == acc_t(0) ? acc_t(0) : e * exp_acc(m_from - m_to);
  }
  CBAM_DEVICE void combine(State& a, const State& b) const {
    a.sum += b.sum;
    if constexpr (LPLSE) {
      a.sq += b.sq;
      acc_t m = a.mx;
      int i = a.idx;
      max_combine(m, i, b.mx, b.idx);
      a.e = rebase(a.e, a.mx, m) + rebase(b.e, b.mx, m);
    }
    max_combine(a.mx, a.idx, b.mx, b.idx);
  }
  CBAM_DEVICE State shfl_xor(const State& s, int lane_mask) const {
    State o;
    o.sum = __shfl_xor_sync(0xffffffffu, s.sum, lane_mask);
    o.mx = __shfl_xor_sync(0xffffffffu, s.mx, lane_mask);
    o.idx = __shfl_xor_sync(0xffffffffu, s.idx, lane_mask);
    if constexpr (LPLSE) {
      o.sq = __shfl_xor_sync(0xffffffffu, s.sq, lane_mask);
      o.e = __shfl_xor_sync(0xffffffffu, s.e, lane_mask);
    }
    return o;
  }
  CBAM_DEVICE void store_final(int64_t o, const State& s) const {
    st(avg + o, s.sum / static_cast<acc_t>(E));
    st(mx + o, s.mx);
    st(arg + o, max_index(s.idx));
    if constexpr (LPLSE) {
      st(lp + o, sqrt_acc(s.sq));
      const bool finite = s.mx - s.mx == acc_t(0);  // false for +-inf and NaN
      st(lse + o, finite ? s.mx + log_acc(s.e) : static_cast<acc_t>(NAN));
    }
  }
  CBAM_DEVICE void store_partial(int64_t o, const State& s) const {
    st(p_sum + o, s.sum);
    st(p_max + o, s.mx);
    st(p_arg + o, s.idx);
    if constexpr (LPLSE) {
      st(p_sq + o, s.sq);
      st(p_exp + o, s.e);
    }
  }
  CBAM_DEVICE State load_partial(int64_t o) const {
    State s;
    s.sum = ld_cg(p_sum + o);  // (written by the group's other blocks: combine_partials.cuh)
    s.mx = ld_cg(p_max + o);
    s.idx = ld_cg(p_arg + o);
    if constexpr (LPLSE) {
      s.sq = ld_cg(p_sq + o);
      s.e = ld_cg(p_exp + o);
    }
    return s;
  }
};

// The scale gradients of the pools (Q2): out[n, kept] = sum_i x (wa[n, i] / div
// + wb[n, i] [kept == widx[n, i]]). Missing wa / wb count as 0.
// With LPLSE (pool over S only: the official code's lp and lse pools of v = x * scale[n, kept]
// also fed the channel head), each element adds
//   x ((wl[n, i] / lp[n, i]) v + we[n, i] exp(v - lse[n, i]))
// (the derivatives of sqrt(sum v^2) and of log sum exp v with respect to the scale); the state
// holds scale[n, kept] (kHasKept: the templates load it once per output and tile).
template <typename acc_t_, bool LPLSE = false>
struct WeightedSumPolicy {
  using acc_t = acc_t_;
  const acc_t* wa;       // [N, E] or nullptr
  const acc_t* wb;       // [N, E] or nullptr
  const int64_t* widx;   // [N, E] (read only with wb)
  int64_t E;             // reduced extent
  acc_t div;             // divisor of wa (the extent the forward pool averaged over)
  acc_t* out;            // [N, L]
  acc_t* p_sum;          // partials [N, P, L] (only with P > 1)
  const acc_t* base;     // [N, L] or nullptr: out = base + the sum
  const acc_t* gate;     // [N, L] or nullptr: then out = (base +) the sum, times gate (1 - gate)
  // LPLSE only:
  const acc_t* kscale;   // [N, L]: the scale the forward pools multiplied x by
  int64_t L;             // kept extent
  const acc_t* wl;       // [N, E] or nullptr
  const acc_t* lp;       // [N, E] (read only with wl)
  const acc_t* we;       // [N, E] or nullptr
  const acc_t* lse;      // [N, E] (read only with we)

  struct BaseState {
    acc_t sum;
  };
  struct LpLseState : BaseState {
    acc_t ks;  // kscale[n, kept] (not combined: the same for every fold of one output)
  };
  using State = std::conditional_t<LPLSE, LpLseState, BaseState>;
  static constexpr int kPartialBytes = sizeof(acc_t);  // per partial
  // 12 bytes for float (an int64 idx made it 16, read as two 8-byte shared loads at a 16-byte
  // lane stride: twice the shared-memory wavefronts); idx < 2^31 (the launchers check the
  // extents), -1 for none.
  struct BaseWeight {
    acc_t a;
    acc_t b;
    int idx;
  };
  struct LpLseWeight : BaseWeight {
    acc_t l;    // wl / lp
    acc_t e;    // we
    acc_t lse;  // lse
  };
  using Weight = std::conditional_t<LPLSE, LpLseWeight, BaseWeight>;

  CBAM_DEVICE State init() const {
    State s;
    s.sum = acc_t(0);
    if constexpr (LPLSE) s.ks = acc_t(1);
    return s;
  }
  static constexpr bool kHasKept = LPLSE;
  CBAM_DEVICE acc_t kept(int64_t n, int64_t k) const {
    return kscale != nullptr ? ld(kscale + n * L + k) : acc_t(1);
  }
  CBAM_DEVICE void set_kept(State& s, acc_t ks) const {
    if constexpr (LPLSE) s.ks = ks;
  }
  CBAM_DEVICE Weight weight(int64_t n, int64_t i) const {
    Weight w;
    w.a = wa != nullptr ? ld(wa + n * E + i) / div : acc_t(0);
    w.b = wb != nullptr ? ld(wb + n * E + i) : acc_t(0);
    w.idx = wb != nullptr ? static_cast<int>(ld(widx + n * E + i)) : -1;
    if constexpr (LPLSE) {
      w.l = wl != nullptr ? ld(wl + n * E + i) / ld(lp + n * E + i) : acc_t(0);
      w.e = we != nullptr ? ld(we + n * E + i) : acc_t(0);
      w.lse = we != nullptr ? ld(lse + n * E + i) : acc_t(0);
    }
    return w;
  }
  CBAM_DEVICE void add(State& s, acc_t xv, const Weight& w, int /*i*/, int64_t kept) const {
    acc_t f = w.a;
    if (w.idx == static_cast<int>(kept)) f += w.b;  // (a 32-bit compare)
    if constexpr (LPLSE) {
      const acc_t v = xv * s.ks;
      f += w.l * v;
      if (w.e != acc_t(0)) f += w.e * exp_acc(v - w.lse);
    }
    s.sum += xv * f;
  }
  CBAM_DEVICE void combine(State& a, const State& b) const { a.sum += b.sum; }
  CBAM_DEVICE State shfl_xor(const State& s, int lane_mask) const {
    State o = s;
    o.sum = __shfl_xor_sync(0xffffffffu, s.sum, lane_mask);
    return o;
  }
  // the block's next two steps in the store: + base (Q1's part), then the sigmoid's backward
  CBAM_DEVICE void store_final(int64_t o, const State& s) const {
    acc_t v = s.sum;
    if (base != nullptr) v = ld(base + o) + v;
    if (gate != nullptr) {
      const acc_t g = ld(gate + o);
      v = v * (acc_t(1) - g) * g;
    }
    st(out + o, v);
  }
  CBAM_DEVICE void store_partial(int64_t o, const State& s) const { st(p_sum + o, s.sum); }
  CBAM_DEVICE State load_partial(int64_t o) const {
    State s = init();
    s.sum = ld_cg(p_sum + o);
    return s;
  }
};

}  // namespace cbam
