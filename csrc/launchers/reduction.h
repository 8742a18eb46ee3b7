// The launch of one reduction of x viewed as [N, R, K], for the pools and their scale gradients
// (launchers/pool.h): kernels/reduce_k.cuh when the reduced axis is the contiguous one, or
// kernels/reduce_k_rows.cuh when those rows are short, or not whole 16-byte vectors and at most
// kMedRowMaxK long, or kernels/reduce_k_shifted.cuh when they are longer such rows; else
// kernels/reduce_r.cuh. One launch: where the reduced axis is split over tiles, the last block of
// each group of tiles folds their partials (kernels/combine_partials.cuh).
#pragma once

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/pool_policies.cuh"
#include "kernels/reduce_k.cuh"
#include "kernels/reduce_k_rows.cuh"
#include "kernels/reduce_k_shifted.cuh"
#include "kernels/reduce_r.cuh"
#include "launchers/common.h"

namespace cbam {

// Partial buffers of the two-stage path ([N, P, L]); they live until the launch is queued.
template <typename acc_t, bool LPLSE, bool SCALED>
void set_partials(PoolPolicy<acc_t, LPLSE, SCALED>& pol, const at::Tensor& x, int64_t N, int64_t P,
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
// `blocks` blocks. Where t.vec_rows_in_flight is 0 (by element size) on the vector path: 4
// where the whole grid is resident at once with the U = 4 instance's blocks an SM
// (reduce_r_min_blocks), else 2 where the U = 2 instance's are and the element size gives 1
// (16-bit x, float64), else the element size's (with_rows_in_flight). A resident grid's blocks
// all run at once, each thread walking its rows to the end, so the loads in flight per thread,
// not more blocks, hide DRAM's latency (a 1024x14x14 bfloat16 channels-last pool over S, batch
// 64: 256 blocks of 256 threads, two an SM, at U = 1 one 16-byte load in flight per thread).
// The same tiles, each column's rows folded in the same order: the same bits for any U.
template <int VEC, typename Policy, typename F>
void with_reduce_r_rows(const Tuning& t, int64_t blocks, F&& f) {
  if constexpr (VEC > 1) {
    if (t.vec_rows_in_flight == 0) {
      const int64_t sms = num_sms();
      if (blocks <= sms * reduce_r_min_blocks<4, Policy>()) {
        return f(std::integral_constant<int, 4>{});
      }
      if (VEC != 4 && blocks <= sms * reduce_r_min_blocks<2, Policy>()) {
        return f(std::integral_constant<int, 2>{});
      }
    }
  }
  with_rows_in_flight<VEC, 4>(t, f);
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
  const int64_t staged = over_k && stages_weights<Policy>()
                             ? static_cast<int64_t>(sizeof(typename Policy::Weight))
                             : 0;
  const int64_t partial = over_k ? 0 : 2 * Policy::kPartialBytes;
  // reduce_k's groups of kReduceKVectors vectors a lane of a row (make_geom): k_tile_vectors over
  // kReduceKVectors of them, at most what the kernel's staged weights hold
  const int groups = over_k && !SHIFTED && debug::k_tile_vectors > kReduceKVectors
                         ? std::min(debug::k_tile_vectors / kReduceKVectors,
                                    reduce_k_groups<Policy, VEC>())
                         : 1;
  LaunchGeom lg = folded_geom(
      v, G, VEC, over_k ? kReduceKVectors : 1, staged, partial, sizeof(T), op,
      over_k || SHIFTED ? SpanLanes::kNever : (FOLD ? SpanLanes::kAlways : SpanLanes::kByKnob),
      groups);
  TORCH_CHECK(!FOLD || lg.g.nkt == 1, op, ": folded rows must fit one tile (", lg.g.nkt, ")");
  lg.g.reverse = next_pass_reversed({&v.x});
  const Fold f = fold_of(v, G);
  const int64_t P = over_k ? lg.g.nkt : lg.g.nrt;
  const int64_t L = over_k ? v.R() : v.K();
  std::vector<at::Tensor> keep;
  const bool second = P > 1 && combine_in_second_launch(P);
  if (P > 1) {
    set_partials(pol, v.x, v.N, P, L, keep);
    // a group a row tile (over k) or column tile (over r), whose last block combines its
    // partials (kernels/combine_partials.cuh); very many partials: a second launch does
    const int64_t groups = v.N * (over_k ? lg.g.nrt : lg.g.nkt);
    lg.g.counters = group_counters(v.x, groups, keep, second);
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
      launch(op, &reduce_r_kernel<T, VEC, false, Policy, true>, lg.grid(), lg.block(), 0,
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
    with_reduce_r_rows<VEC, Policy>(lg.tune, lg.g.N * lg.g.nrt * lg.g.nkt, [&](auto u) {
      launch(op, reduce_r_entry<T, VEC, decltype(u)::value, FOLD, Policy>(), lg.grid(),
             lg.block(), 0, global_ptr<T>(v.x), pol, lg.g, f);
    });
  }
  if (second && over_k) {
    launch_combine_groups<true>(op, pol, lg.g, L);
  } else if (second) {
    launch_combine_groups<false>(op, pol, lg.g, L);
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

}  // namespace cbam
