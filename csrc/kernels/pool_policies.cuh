// What the two reduction templates (reduce_k.cuh, reduce_r.cuh) fold. A policy gives:
//   State                 the running fold of one output element, combine()d in a fixed tree order
//   Weight, weight(n, i)  the small per-element factor along the reduced axis (index i)
//   add(state, x, w, i, kept)   fold one x element (reduced index i, kept index `kept`)
//   store_final / store_partial / load_partial   outputs [N, L] and partials [N, P, L]
#pragma once

#include "kernels/common.cuh"

namespace cbam {

// The pools: v = x * scale[n, i] (a missing scale is 1); avg = sum v / E, max = max v,
// argmax = first index of the max (NaN wins, first NaN).
template <typename acc_t_>
struct PoolPolicy {
  using acc_t = acc_t_;
  const acc_t* scale;  // [N, E] along the reduced axis, or nullptr
  int64_t E;           // reduced extent
  acc_t* avg;          // [N, L]
  acc_t* mx;           // [N, L]
  int64_t* arg;        // [N, L]
  acc_t* p_sum;        // partials [N, P, L] (only with P > 1)
  acc_t* p_max;
  int* p_arg;

  struct State {
    acc_t sum;
    acc_t mx;
    int idx;
  };
  static constexpr int kPartialBytes = 2 * sizeof(acc_t) + sizeof(int);  // per partial
  struct Weight {
    acc_t s;
  };

  CBAM_DEVICE State init() const {
    State s;
    s.sum = acc_t(0);
    s.mx = static_cast<acc_t>(-INFINITY);
    s.idx = kNoIndex;
    return s;
  }
  CBAM_DEVICE Weight weight(int64_t n, int64_t i) const {
    Weight w;
    w.s = scale != nullptr ? ld(scale + n * E + i) : acc_t(1);
    return w;
  }
  CBAM_DEVICE void add(State& s, acc_t xv, const Weight& w, int i, int64_t /*kept*/) const {
    const acc_t v = xv * w.s;
    s.sum += v;
    max_combine(s.mx, s.idx, v, i);
  }
  CBAM_DEVICE void combine(State& a, const State& b) const {
    a.sum += b.sum;
    max_combine(a.mx, a.idx, b.mx, b.idx);
  }
  CBAM_DEVICE State shfl_xor(const State& s, int lane_mask) const {
    State o;
    o.sum = __shfl_xor_sync(0xffffffffu, s.sum, lane_mask);
    o.mx = __shfl_xor_sync(0xffffffffu, s.mx, lane_mask);
    o.idx = __shfl_xor_sync(0xffffffffu, s.idx, lane_mask);
    return o;
  }
  CBAM_DEVICE void store_final(int64_t o, const State& s) const {
    st(avg + o, s.sum / static_cast<acc_t>(E));
    st(mx + o, s.mx);
    st(arg + o, static_cast<int64_t>(s.idx));
  }
  CBAM_DEVICE void store_partial(int64_t o, const State& s) const {
    st(p_sum + o, s.sum);
    st(p_max + o, s.mx);
    st(p_arg + o, s.idx);
  }
  CBAM_DEVICE State load_partial(int64_t o) const {
    State s;
    s.sum = ld(p_sum + o);
    s.mx = ld(p_max + o);
    s.idx = ld(p_arg + o);
    return s;
  }
};

// The scale gradients of the pools (Q2): out[n, kept] = sum_i x (wa[n, i] / div
// + wb[n, i] [kept == widx[n, i]]). Missing wa / wb count as 0.
template <typename acc_t_>
struct WeightedSumPolicy {
  using acc_t = acc_t_;
  const acc_t* wa;       // [N, E] or nullptr
  const acc_t* wb;       // [N, E] or nullptr
  const int64_t* widx;   // [N, E] (read only with wb)
  int64_t E;             // reduced extent
  acc_t div;             // divisor of wa (the extent the forward pool averaged over)
  acc_t* out;            // [N, L]
  acc_t* p_sum;          // partials [N, P, L] (only with P > 1)

  struct State {
    acc_t sum;
  };
  static constexpr int kPartialBytes = sizeof(acc_t);  // per partial
  struct Weight {
    acc_t a;
    acc_t b;
    int64_t idx;
  };

  CBAM_DEVICE State init() const {
    State s;
    s.sum = acc_t(0);
    return s;
  }
  CBAM_DEVICE Weight weight(int64_t n, int64_t i) const {
    Weight w;
    w.a = wa != nullptr ? ld(wa + n * E + i) / div : acc_t(0);
    w.b = wb != nullptr ? ld(wb + n * E + i) : acc_t(0);
    w.idx = wb != nullptr ? ld(widx + n * E + i) : int64_t(-1);
    return w;
  }
  CBAM_DEVICE void add(State& s, acc_t xv, const Weight& w, int /*i*/, int64_t kept) const {
    s.sum += xv * (w.idx == kept ? w.a + w.b : w.a);
  }
  CBAM_DEVICE void combine(State& a, const State& b) const { a.sum += b.sum; }
  CBAM_DEVICE State shfl_xor(const State& s, int lane_mask) const {
    State o;
    o.sum = __shfl_xor_sync(0xffffffffu, s.sum, lane_mask);
    return o;
  }
  CBAM_DEVICE void store_final(int64_t o, const State& s) const { st(out + o, s.sum); }
  CBAM_DEVICE void store_partial(int64_t o, const State& s) const { st(p_sum + o, s.sum); }
  CBAM_DEVICE State load_partial(int64_t o) const {
    State s;
    s.sum = ld(p_sum + o);
    return s;
  }
};

}  // namespace cbam
