// Launchers of the pools and their scale gradients (Q2): pool_over_s, pool_over_s_lp_lse,
// pool_over_c, pool_over_s_backward_scale, pool_over_s_backward_scale_lp_lse,
// pool_over_c_backward_scale. Each is one reduction of x viewed as [N, R, K]
// (kernels/reduce_k.cuh when the reduced axis is the contiguous one, or kernels/reduce_k_rows.cuh
// when those rows are short, or not whole 16-byte vectors and at most kMedRowMaxK long, or
// kernels/reduce_k_shifted.cuh when they are longer such rows; else kernels/reduce_r.cuh), one
// launch: where the reduced axis is split over tiles, the last block of each group of tiles folds
// their partials (kernels/combine_partials.cuh).
#include <algorithm>
#include <vector>

#include "kernels/pool_policies.cuh"
#include "kernels/reduce_k.cuh"
#include "kernels/reduce_k_rows.cuh"
#include "kernels/reduce_k_shifted.cuh"
#include "kernels/reduce_r.cuh"
#include "launchers/common.h"

namespace cbam {
namespace {

// Partial buffers of the two-stage path ([N, P, L]); they live until the launch is queued.
template <typename acc_t, bool LPLSE>
void set_partials(PoolPolicy<acc_t, LPLSE>& pol, const at::Tensor& x, int64_t N, int64_t P,
                  int64_t L, std::vector<at::Tensor>& keep) {
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto partial = [&](c10::TensorOptions o) {
    keep.push_back(new_output({N, P, L}, o));  // (poisoned under the debug knob, as outputs)
    return keep.back();
  };
  pol.p_sum = global_ptr<acc_t>(partial(opts));
  pol.p_max = global_ptr<acc_t>(partial(opts));
  pol.p_arg = global_ptr<int>(partial(x.options().dtype(at::kInt)));
  if constexpr (LPLSE) {
    pol.p_sq = global_ptr<acc_t>(partial(opts));
    pol.p_exp = global_ptr<acc_t>(partial(opts));
  }
}

template <typename acc_t, bool LPLSE>
void set_partials(WeightedSumPolicy<acc_t, LPLSE>& pol, const at::Tensor& x, int64_t N, int64_t P,
                  int64_t L, std::vector<at::Tensor>& keep) {
  keep.push_back(new_output({N, P, L}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value)));
  pol.p_sum = global_ptr<acc_t>(keep.back());
}

// Calls f(std::integral_constant<int, U>{}) with reduce_r's rows in flight U for a grid of
// `blocks` blocks. Where debug::vec_rows_in_flight is 0 (by element size) on the vector path: 4
// where the whole grid is resident at once with the U = 4 instance's blocks an SM
// (reduce_r_min_blocks), else 2 where the U = 2 instance's are and the element size gives 1
// (16-bit x, float64), else the element size's (with_rows_in_flight). A resident grid's blocks
// all run at once, each thread walking its rows to the end, so the loads in flight per thread,
// not more blocks, hide DRAM's latency (a 1024x14x14 bfloat16 channels-last pool over S, batch
// 64: 256 blocks of 256 threads, two an SM, at U = 1 one 16-byte load in flight per thread).
// The same tiles, each column's rows folded in the same order: the same bits for any U.
template <int VEC, typename Policy, typename F>
void with_reduce_r_rows(int64_t blocks, F&& f) {
  if constexpr (VEC > 1) {
    if (debug::vec_rows_in_flight == 0) {
      const int64_t sms = num_sms();
      if (blocks <= sms * reduce_r_min_blocks<4, Policy>()) {
        return f(std::integral_constant<int, 4>{});
      }
      if (VEC != 4 && blocks <= sms * reduce_r_min_blocks<2, Policy>()) {
        return f(std::integral_constant<int, 2>{});
      }
    }
  }
  with_rows_in_flight<VEC, 4>(f);
}

// Reduces x [N, R, K] over k (over_k) or over r with `pol`, whose outputs are set.
// FOLD (over r only): rows folded G at a time (Fold), one tile spanning a folded row.
// SHIFTED: rows that are not whole vectors; over k, each row's 16-byte vectors from its first
// 16-byte boundary (reduce_k_shifted); over r, each thread's VEC columns of a row from the
// window they start in and the next lane's (reduce_r's SHIFT, one row in flight; lanes by
// powers of two, so that a row's lanes are consecutive lanes of one warp).
template <typename T, int VEC, bool FOLD = false, bool SHIFTED = false, typename Policy>
void run_reduction(const char* op, const XView& v, bool over_k, Policy pol, int G = 1) {
  // Side traffic per column of a tile (make_geom): over k, the staged weights (its partials
  // split k, not the rows); over r, the partials, written and read again.
  const int64_t staged = over_k ? static_cast<int64_t>(sizeof(typename Policy::Weight)) : 0;
  const int64_t partial = over_k ? 0 : 2 * Policy::kPartialBytes;
  LaunchGeom lg = folded_geom(
      v, G, VEC, over_k ? kReduceKVectors : 1, staged, partial, sizeof(T), op,
      over_k || SHIFTED ? SpanLanes::kNever : (FOLD ? SpanLanes::kAlways : SpanLanes::kByKnob));
  TORCH_CHECK(!FOLD || lg.g.nkt == 1, op, ": folded rows must fit one tile (", lg.g.nkt, ")");
  lg.g.reverse = next_pass_reversed({&v.x});
  const Fold f = fold_of(v, G);
  const int64_t P = over_k ? lg.g.nkt : lg.g.nrt;
  const int64_t L = over_k ? v.R() : v.K();
  std::vector<at::Tensor> keep;
  if (P > 1) {
    set_partials(pol, v.x, v.N, P, L, keep);
    // a group a row tile (over k) or column tile (over r), whose last block combines its
    // partials (kernels/combine_partials.cuh)
    lg.g.counters = group_counters(v.x, v.N * (over_k ? lg.g.nrt : lg.g.nkt), keep);
  }
  // reduce_k_mode 3: where the whole grid is resident at once with reduce_k_rows_blocks blocks
  // an SM (few, long rows), the instance with kReduceKRows rows of loads in flight per thread:
  // the same tiles and bits, twice the bytes in flight (reduce_k.cuh, UR).
  const bool k_rows = over_k && debug::reduce_k_mode == 3 &&
                      lg.g.N * lg.g.nrt * lg.g.nkt <=
                          static_cast<int64_t>(num_sms()) * reduce_k_rows_blocks<Policy>();
  if constexpr (SHIFTED) {
    if (over_k) {
      launch(op, &reduce_k_shifted_kernel<T, VEC, Policy>, lg.grid(), lg.block(), 0,
             global_ptr<T>(v.x), pol, lg.g);
    } else {
      launch(op, &reduce_r_kernel<T, VEC, 1, false, Policy, true>, lg.grid(), lg.block(), 0,
             global_ptr<T>(v.x), pol, lg.g, f);
    }
  } else if (over_k && debug::k_vectors_in_flight == 1) {
    launch(op, &reduce_k_kernel<T, VEC, 1, 1, Policy>, lg.grid(), lg.block(), 0,
           global_ptr<T>(v.x), pol, lg.g);
  } else if (k_rows) {
    launch(op, &reduce_k_kernel<T, VEC, kReduceKVectors, kReduceKRows, Policy>, lg.grid(),
           lg.block(), 0, global_ptr<T>(v.x), pol, lg.g);
  } else if (over_k) {
    launch(op, &reduce_k_kernel<T, VEC, kReduceKVectors, 1, Policy>, lg.grid(), lg.block(), 0,
           global_ptr<T>(v.x), pol, lg.g);
  } else {
    with_reduce_r_rows<VEC, Policy>(lg.g.N * lg.g.nrt * lg.g.nkt, [&](auto u) {
      launch(op, &reduce_r_kernel<T, VEC, decltype(u)::value, FOLD, Policy>, lg.grid(),
             lg.block(), 0, global_ptr<T>(v.x), pol, lg.g, f);
    });
  }
}

// Reduces x [N, R, K] over k with its rows staged whole in shared memory (reduce_k_rows, one
// stage): short rows (K * sizeof(acc_t) <= kShortRowBytes) one thread a row, 128 rows a block;
// medium ones (MED: K <= kMedRowMaxK) as many rows a block as the span holds, a power of two of
// 4 to 128 (a float32 13x13 map: 32 rows of 169), with TX = 128 / rows lanes a row.
template <typename T, bool MED, typename Policy>
void run_staged_rows(const char* op, const XView& v, const Policy& pol) {
  using acc_t = typename Policy::acc_t;
  constexpr int V = vec_width<T>();
  const int64_t R = v.R(), K = v.K();
  int rpb = kShortRows;  // rows a block
  if constexpr (MED) {
    const int64_t fit = std::min<int64_t>(kShortRows, span_elems<acc_t>() / (K | 1));
    rpb = 1;
    while (2 * rpb <= fit) rpb *= 2;
    TORCH_CHECK(rpb >= kShortRows / 32 && K <= med_row_max_k<Policy>(), op,
                ": internal error: rows of ", K, " elements staged ", rpb, " a block");
  }
  const int64_t blocks = v.N * ceil_div(R, rpb);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op,
              ": the input is too large for one launch (", blocks, " blocks)");
  // 16-byte loads when every block's span of rpb rows starts 16-byte aligned
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(T));
  const bool vec = aligned16(global_ptr<T>(v.x)) && (R * row_bytes) % 16 == 0 &&
                   (rpb * row_bytes) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(blocks)), block(kShortRows);
  const int tx = kShortRows / rpb;
  const int reverse = next_pass_reversed({&v.x});
  if (vec) {
    launch(op, &reduce_k_rows_kernel<T, V, MED, Policy>, grid, block, 0, global_ptr<T>(v.x), pol,
           R, static_cast<int>(K), tx, reverse);
  } else {
    launch(op, &reduce_k_rows_kernel<T, 1, MED, Policy>, grid, block, 0, global_ptr<T>(v.x), pol,
           R, static_cast<int>(K), tx, reverse);
  }
}

template <typename T, typename Policy>
void reduction(const char* op, const XView& v, bool over_k, const Policy& pol) {
  using acc_t = typename Policy::acc_t;
  constexpr int V = vec_width<T>();
  if (over_k && debug::reduce_k_mode >= 2 && debug::tile_mode == 0) {
    if (v.K() * static_cast<int64_t>(sizeof(acc_t)) <= kShortRowBytes) {
      run_staged_rows<T, false>(op, v, pol);
      return;
    }
    if (v.K() % V != 0 && v.K() <= med_row_max_k<Policy>()) {
      // rows that are not whole 16-byte vectors: staged whole, with 16-byte loads of the span
      run_staged_rows<T, true>(op, v, pol);
      return;
    }
  }
  const bool aligned = aligned16(global_ptr<T>(v.x));
  const int G = aligned ? fold_rows(v, V) : 0;
  if (over_k && aligned && v.K() % V != 0) {
    // over k, longer rows that are not whole 16-byte vectors (or under the debug tilings): each
    // row's 16-byte vectors from its first 16-byte boundary, the few elements before and after
    // them one at a time (reduce_k would take the whole row one element a load)
    run_reduction<T, V, false, true>(op, v, over_k, pol);
  } else if (G == 1) {
    run_reduction<T, V>(op, v, over_k, pol);
  } else if (G > 1 && !over_k && debug::tile_mode != 1 && v.K() * G / V <= kMaxSpanCols) {
    // over r, rows of K % V != 0 folded G at a time into whole vectors, one tile a folded row
    // (a 7x7 channels-first map: 4 rows of 49 floats, 49 vectors)
    run_reduction<T, V, true>(op, v, over_k, pol, G);
  } else if (!over_k && aligned && v.K() % V != 0 && v.K() >= V) {
    // over r, rows that are not whole vectors and do not fold (G does not divide the rows, the
    // folded row is longer than one tile spans, a 19x19 map's 361 vectors, or the tiny tiles):
    // each thread's columns of a row from the 16-byte window they start in and the next lane's
    run_reduction<T, V, false, true>(op, v, over_k, pol);
  } else {
    run_reduction<T, 1>(op, v, over_k, pol);
  }
}

// over_s: pool over S (scale [N, S], outputs [N, C]); else pool over C. lp_lse (over S only):
// also the lp and lse pools, in the same pass. Returns avg, max, argmax (and lp, lse).
std::vector<at::Tensor> pool(const char* op, const at::Tensor& x_in,
                             const std::optional<at::Tensor>& scale_in, bool over_s, bool lp_lse) {
  const c10::DeviceGuard device_guard(x_in.device());  // launches go to x's device
  const XView v = view_x(x_in, op, "x");
  const auto acc = acc_type_of(v.x.scalar_type());
  const int64_t E = over_s ? v.S : v.C, L = over_s ? v.C : v.S;
  const at::Tensor scale = small_arg(scale_in, v.x, v.N, E, acc, op, "scale",
                                     over_s ? "[N, S]" : "[N, C]");
  const auto opts = v.x.options().dtype(acc);
  std::vector<at::Tensor> out{new_output({v.N, L}, opts), new_output({v.N, L}, opts),
                              new_output({v.N, L}, opts.dtype(at::kLong))};
  if (lp_lse) {
    out.push_back(new_output({v.N, L}, opts));
    out.push_back(new_output({v.N, L}, opts));
  }
  if (v.N == 0 || L == 0) return out;
  TORCH_CHECK(E > 0, op, ": x must have at least one ", over_s ? "spatial position" : "channel",
              " to pool over, got shape ", x_in.sizes());
  const bool over_k = over_s != v.cl;  // channels-first keeps S contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "cbam_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto run = [&](auto pol) {
      pol.scale = opt_ptr<acc_t>(scale);
      pol.E = E;
      pol.avg = global_ptr<acc_t>(out[0]);
      pol.mx = global_ptr<acc_t>(out[1]);
      pol.arg = global_ptr<int64_t>(out[2]);
      if (lp_lse) {
        pol.lp = global_ptr<acc_t>(out[3]);
        pol.lse = global_ptr<acc_t>(out[4]);
      }
      reduction<scalar_t>(op, v, over_k, pol);
    };
    if (lp_lse) {
      run(PoolPolicy<acc_t, true>{});
    } else {
      run(PoolPolicy<acc_t, false>{});
    }
  });
  return out;
}

// The extra inputs of pool_over_s_backward_scale_lp_lse ([N, S] scale, [N, C] the others).
struct LpLseScaleGrads {
  std::optional<at::Tensor> scale, d_lp, lp, d_lse, lse;
};

// over_s: the scale gradient of pool_over_s ([N, S] = sum_c x (da/S + dm [s == is]), small
// tensors [N, C]); else of pool_over_c ([N, C] = sum_s x (du/C + dv [c == ic]), small [N, S]).
// ext (over_s only): also the lp / lse pools' terms (pool_over_s_backward_scale_lp_lse).
// base, gate ([N, S] over_s, else [N, C]): out = (base + the sum) gate (1 - gate), each step
// where given (the block's next steps, in the kernels' store).
at::Tensor pool_backward_scale(const char* op, const at::Tensor& x_in,
                               const std::optional<at::Tensor>& d_avg_in,
                               const std::optional<at::Tensor>& d_max_in,
                               const std::optional<at::Tensor>& argmax_in,
                               const std::optional<at::Tensor>& base_in,
                               const std::optional<at::Tensor>& gate_in, bool over_s,
                               const LpLseScaleGrads* ext = nullptr) {
  const c10::DeviceGuard device_guard(x_in.device());
  const XView v = view_x(x_in, op, "x");
  const auto acc = acc_type_of(v.x.scalar_type());
  // The forward pool reduced over E_fwd and kept L_fwd; this reduction goes over L_fwd.
  const int64_t E_fwd = over_s ? v.S : v.C, L_fwd = over_s ? v.C : v.S;
  const char* shape = over_s ? "[N, C]" : "[N, S]";
  const at::Tensor d_avg = small_arg(d_avg_in, v.x, v.N, L_fwd, acc, op, "d_avg", shape);
  const at::Tensor d_max = small_arg(d_max_in, v.x, v.N, L_fwd, acc, op, "d_max", shape);
  const at::Tensor argmax = small_arg(argmax_in, v.x, v.N, L_fwd, at::kLong, op, "argmax", shape);
  TORCH_CHECK(!d_max.defined() || argmax.defined(), op, ": d_max needs argmax");
  at::Tensor scale, d_lp, lp, d_lse, lse;
  if (ext != nullptr) {
    scale = small_arg(ext->scale, v.x, v.N, E_fwd, acc, op, "scale", "[N, S]");
    d_lp = small_arg(ext->d_lp, v.x, v.N, L_fwd, acc, op, "d_lp", shape);
    lp = small_arg(ext->lp, v.x, v.N, L_fwd, acc, op, "lp", shape);
    d_lse = small_arg(ext->d_lse, v.x, v.N, L_fwd, acc, op, "d_lse", shape);
    lse = small_arg(ext->lse, v.x, v.N, L_fwd, acc, op, "lse", shape);
    TORCH_CHECK(!d_lp.defined() || lp.defined(), op, ": d_lp needs lp");
    TORCH_CHECK(!d_lse.defined() || lse.defined(), op, ": d_lse needs lse");
  }
  const char* out_shape = over_s ? "[N, S]" : "[N, C]";
  const at::Tensor base = small_arg(base_in, v.x, v.N, E_fwd, acc, op, "base", out_shape);
  const at::Tensor gate = small_arg(gate_in, v.x, v.N, E_fwd, acc, op, "gate", out_shape);
  at::Tensor out = new_output({v.N, E_fwd}, v.x.options().dtype(acc));
  if (out.numel() == 0) return out;
  if (L_fwd == 0) {  // an empty sum: the store's steps alone
    at::Tensor z = base.defined() ? base.clone() : out.zero_();
    return gate.defined() ? at::sigmoid_backward(z, gate) : z;
  }
  const bool over_k = over_s == v.cl;  // reduces over the forward pool's kept axis
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "cbam_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto run = [&](auto pol) {
      pol.wa = opt_ptr<acc_t>(d_avg);
      pol.wb = opt_ptr<acc_t>(d_max);
      pol.widx = opt_ptr<int64_t>(argmax);
      pol.E = L_fwd;
      pol.div = static_cast<acc_t>(E_fwd);
      pol.out = global_ptr<acc_t>(out);
      pol.base = opt_ptr<acc_t>(base);
      pol.gate = opt_ptr<acc_t>(gate);
      pol.kscale = opt_ptr<acc_t>(scale);
      pol.L = E_fwd;
      pol.wl = opt_ptr<acc_t>(d_lp);
      pol.lp = opt_ptr<acc_t>(lp);
      pol.we = opt_ptr<acc_t>(d_lse);
      pol.lse = opt_ptr<acc_t>(lse);
      reduction<scalar_t>(op, v, over_k, pol);
    };
    if (ext != nullptr) {
      run(WeightedSumPolicy<acc_t, true>{});
    } else {
      run(WeightedSumPolicy<acc_t, false>{});
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_over_s(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& scale) {
  const auto o = pool("pool_over_s", x, scale, true, false);
  return {o[0], o[1], o[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_over_s_lp_lse(
    const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  const auto o = pool("pool_over_s_lp_lse", x, scale, true, true);
  return {o[0], o[1], o[2], o[3], o[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_over_c(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& scale) {
  const auto o = pool("pool_over_c", x, scale, false, false);
  return {o[0], o[1], o[2]};
}

at::Tensor pool_over_s_backward_scale(const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
                                      const std::optional<at::Tensor>& d_max,
                                      const std::optional<at::Tensor>& argmax,
                                      const std::optional<at::Tensor>& base,
                                      const std::optional<at::Tensor>& gate) {
  return pool_backward_scale("pool_over_s_backward_scale", x, d_avg, d_max, argmax, base, gate,
                             true);
}

at::Tensor pool_over_c_backward_scale(const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
                                      const std::optional<at::Tensor>& d_max,
                                      const std::optional<at::Tensor>& argmax,
                                      const std::optional<at::Tensor>& base,
                                      const std::optional<at::Tensor>& gate) {
  return pool_backward_scale("pool_over_c_backward_scale", x, d_avg, d_max, argmax, base, gate,
                             false);
}

at::Tensor pool_over_s_backward_scale_lp_lse(
    const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
    const std::optional<at::Tensor>& d_max, const std::optional<at::Tensor>& argmax,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& d_lp,
    const std::optional<at::Tensor>& lp, const std::optional<at::Tensor>& d_lse,
    const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& base,
    const std::optional<at::Tensor>& gate) {
  const LpLseScaleGrads ext{scale, d_lp, lp, d_lse, lse};
  return pool_backward_scale("pool_over_s_backward_scale_lp_lse", x, d_avg, d_max, argmax, base,
                             gate, true, &ext);
}

}  // namespace cbam
