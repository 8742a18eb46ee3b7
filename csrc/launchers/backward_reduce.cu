// Launcher of backward_reduce (Q1, kernels/backward_reduce.cuh): rc [N, C] and rs [N, S] in one
// pass over grad and x, one launch (where a reduction spans several tiles, the last block of each
// group of tiles sums their partials in order: kernels/combine_partials.cuh). Rows of
// K % VEC != 0 fold into whole vectors (backward_reduce_folded_kernel) where one tile spans a
// folded row; else they are loaded shifted (backward_reduce_kernel's SHIFT) where g and x are
// 16-byte aligned; else one element a load.
#include "kernels/backward_reduce.cuh"
#include "launchers/common.h"

namespace cbam {
namespace {

// FOLD: rows folded G at a time (Fold), one tile spanning a folded row (span lanes). SHIFT: rows
// of K % VEC != 0 as they are, loaded shifted.
template <typename T, int VEC, bool FOLD = false, bool SHIFT = false>
void run_backward_reduce(const XView& v, const at::Tensor& g, const at::Tensor& gr,
                         const at::Tensor& gk, at::Tensor& out_r, at::Tensor& out_k, bool need_r,
                         bool need_k, int G = 1) {
  using acc_t = at::opmath_type<T>;
  const char* op = "backward_reduce";
  // Side traffic per column: gk staged, and the column partials written and read again.
  LaunchGeom lg = folded_geom(v, G, VEC, 1, sizeof(acc_t), 2 * sizeof(acc_t), sizeof(T), op,
                              FOLD ? SpanLanes::kAlways : SpanLanes::kNever);
  TORCH_CHECK(!FOLD || lg.g.nkt == 1, op, ": folded rows must fit one tile (", lg.g.nkt, ")");
  lg.g.reverse = next_pass_reversed({&g, &v.x});
  const auto opts = v.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // (partials poisoned under the debug knob, as outputs: a group's last block must not read
  // one before it is written)
  const at::Tensor part_r =
      !need_r ? at::Tensor() : (lg.g.nkt > 1 ? new_output({v.N, lg.g.nkt, v.R()}, opts) : out_r);
  const at::Tensor part_k =
      !need_k ? at::Tensor() : (lg.g.nrt > 1 ? new_output({v.N, lg.g.nrt, v.K()}, opts) : out_k);
  // groups (kernels/combine_partials.cuh): each row tile's nkt blocks (the row sums), then each
  // column tile's nrt blocks (the column sums)
  std::vector<at::Tensor> keep;
  const bool split_r = need_r && lg.g.nkt > 1, split_k = need_k && lg.g.nrt > 1;
  // very many partials (either side): both sides' partials folded by second launches
  const bool second = (split_r && combine_in_second_launch(lg.g.nkt)) ||
                      (split_k && combine_in_second_launch(lg.g.nrt));
  if (split_r || split_k) {
    const int64_t groups = v.N * (lg.g.nrt + lg.g.nkt);
    lg.g.counters = group_counters(v.x, groups, keep, second);
  }
  acc_t* const o_r = need_r ? global_ptr<acc_t>(out_r) : nullptr;
  acc_t* const o_k = need_k ? global_ptr<acc_t>(out_k) : nullptr;
  acc_t* const p_r = need_r ? global_ptr<acc_t>(part_r) : nullptr;
  acc_t* const p_k = need_k ? global_ptr<acc_t>(part_k) : nullptr;
  const auto run = [&](auto u) {
    if constexpr (FOLD) {
      launch(op, &backward_reduce_folded_kernel<T, VEC, decltype(u)::value, acc_t>, lg.grid(),
             lg.block(), 0, global_ptr<T>(g), global_ptr<T>(v.x), opt_ptr<acc_t>(gr),
             opt_ptr<acc_t>(gk), p_r, p_k, o_k, lg.g, fold_of(v, G), need_r, need_k);
    } else {
      launch(op, &backward_reduce_kernel<T, VEC, decltype(u)::value, acc_t, SHIFT>, lg.grid(),
             lg.block(), 0, global_ptr<T>(g), global_ptr<T>(v.x), opt_ptr<acc_t>(gr),
             opt_ptr<acc_t>(gk), p_r, p_k, o_r, o_k, lg.g, need_r, need_k);
    }
  };
  if constexpr (SHIFT) {
    run(std::integral_constant<int, 1>{});  // one row in flight (its window and the next's)
  } else {
    with_rows_in_flight<VEC>(lg.tune, run);
  }
  // (the tensors the first launch was handed: no global_ptr call in between)
  if (second && split_r) {
    launch_combine_groups<true>(op, SumPolicy<acc_t>{p_r, o_r}, lg.g, lg.g.R);
  }
  if (second && split_k) {  // (folded rows: the original columns, K0 of them)
    launch_combine_groups<false>(op, SumPolicy<acc_t>{p_k, o_k}, lg.g, FOLD ? v.K() : lg.g.K);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_in,
                                                   const at::Tensor& x_in,
                                                   const std::optional<at::Tensor>& gc_in,
                                                   const std::optional<at::Tensor>& gs_in,
                                                   bool need_rc, bool need_rs) {
  const char* op = "backward_reduce";
  const c10::DeviceGuard device_guard(x_in.device());  // launches go to x's device
  const XView v = view_x(x_in, op, "x");
  const at::Tensor g = like_x(grad_in, v, x_in, op, "grad");
  const auto acc = acc_type_of(v.x.scalar_type());
  const at::Tensor gc = small_arg(gc_in, v.x, v.N, v.C, acc, op, "gc", "[N, C]");
  const at::Tensor gs = small_arg(gs_in, v.x, v.N, v.S, acc, op, "gs", "[N, S]");
  const auto opts = v.x.options().dtype(acc);
  at::Tensor rc = need_rc ? new_output({v.N, v.C}, opts) : at::empty({0}, opts);
  at::Tensor rs = need_rs ? new_output({v.N, v.S}, opts) : at::empty({0}, opts);
  if (!need_rc && !need_rs) return {rc, rs};
  if (v.x.numel() == 0) {  // empty sums
    if (need_rc) rc.zero_();
    if (need_rs) rs.zero_();
    return {rc, rs};
  }
  at::Tensor& out_r = v.cl ? rs : rc;
  at::Tensor& out_k = v.cl ? rc : rs;
  const bool need_r = v.cl ? need_rs : need_rc;
  const bool need_k = v.cl ? need_rc : need_rs;
  const at::Tensor& gr = v.cl ? gs : gc;
  const at::Tensor& gk = v.cl ? gc : gs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "cbam_fused", [&] {
    constexpr int V = vec_width<scalar_t>();
    const int G = aligned16(v.x.data_ptr()) && aligned16(g.data_ptr()) ? fold_rows(v, V) : 0;
    const int64_t need = v.K() / V;  // vectors a row (G == 1)
    if (G == 1 && debug::reduce_r_mode == 1 && debug::tile_mode != 1 && need <= kMaxSpanCols &&
        (need & (need - 1)) != 0) {
      // reduce_r_mode 1: span lanes for the reductions over rows; backward_reduce's row sums
      // then go through shared memory, as for folded rows (G = 1: the rows as they are)
      run_backward_reduce<scalar_t, V, true>(v, g, gr, gk, out_r, out_k, need_r, need_k, 1);
    } else if (G == 1) {
      run_backward_reduce<scalar_t, V>(v, g, gr, gk, out_r, out_k, need_r, need_k);
    } else if (G > 1 && debug::tile_mode != 1 && v.K() * G / V <= kMaxSpanCols) {
      // rows of K % V != 0 folded G at a time into whole vectors, one tile a folded row
      run_backward_reduce<scalar_t, V, true>(v, g, gr, gk, out_r, out_k, need_r, need_k, G);
    } else if (aligned16(v.x.data_ptr()) && aligned16(g.data_ptr()) && v.K() % V != 0 &&
               v.K() >= V) {
      // rows that are not whole vectors and do not fold (G does not divide the rows, the folded
      // row is longer than one tile spans, or the tiny tiles): each thread's columns of a row
      // from the 16-byte window they start in and the next lane's
      run_backward_reduce<scalar_t, V, false, true>(v, g, gr, gk, out_r, out_k, need_r, need_k);
    } else {
      run_backward_reduce<scalar_t, 1>(v, g, gr, gk, out_r, out_k, need_r, need_k);
    }
  });
  return {rc, rs};
}

}  // namespace cbam
