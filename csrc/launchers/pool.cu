// Launchers of the pools and their scale gradients (Q2): pool_over_s, pool_over_c,
// pool_over_s_backward_scale, pool_over_c_backward_scale. Each is one reduction of x viewed as
// [N, R, K] (kernels/reduce_k.cuh when the reduced axis is the contiguous one, else
// kernels/reduce_r.cuh), plus the second stage (kernels/combine_partials.cuh) when the reduced
// axis is split over tiles.
#include <vector>

#include "kernels/combine_partials.cuh"
#include "kernels/pool_policies.cuh"
#include "kernels/reduce_k.cuh"
#include "kernels/reduce_r.cuh"
#include "launchers/common.h"

namespace cbam {
namespace {

// Partial buffers of the two-stage path ([N, P, L]); they live until the launches are queued.
template <typename acc_t>
void set_partials(PoolPolicy<acc_t>& pol, const at::Tensor& x, int64_t N, int64_t P, int64_t L,
                  std::vector<at::Tensor>& keep) {
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  keep.push_back(at::empty({N, P, L}, opts));
  keep.push_back(at::empty({N, P, L}, opts));
  keep.push_back(at::empty({N, P, L}, x.options().dtype(at::kInt)));
  pol.p_sum = global_ptr<acc_t>(keep[keep.size() - 3]);
  pol.p_max = global_ptr<acc_t>(keep[keep.size() - 2]);
  pol.p_arg = global_ptr<int>(keep[keep.size() - 1]);
}

template <typename acc_t>
void set_partials(WeightedSumPolicy<acc_t>& pol, const at::Tensor& x, int64_t N, int64_t P,
                  int64_t L, std::vector<at::Tensor>& keep) {
  keep.push_back(at::empty({N, P, L}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value)));
  pol.p_sum = global_ptr<acc_t>(keep.back());
}

// Reduces x [N, R, K] over k (over_k) or over r with `pol`, whose outputs are set.
template <typename T, int VEC, typename Policy>
void run_reduction(const char* op, const XView& v, bool over_k, Policy pol) {
  // Side traffic per column: the staged weights (over k) or the partials, written and read
  // again (over r).
  const int64_t side = over_k ? static_cast<int64_t>(sizeof(typename Policy::Weight))
                              : 2 * Policy::kPartialBytes;
  const LaunchGeom lg = make_geom(v.N, v.R(), v.K(), VEC, over_k ? kReduceKVectors : 1, side,
                                  sizeof(T), op);
  const int64_t P = over_k ? lg.g.nkt : lg.g.nrt;
  const int64_t L = over_k ? v.R() : v.K();
  std::vector<at::Tensor> keep;
  if (P > 1) set_partials(pol, v.x, v.N, P, L, keep);
  if (over_k) {
    launch(op, &reduce_k_kernel<T, VEC, Policy>, lg.grid(), lg.block(), 0, global_ptr<T>(v.x),
           pol, lg.g);
  } else {
    with_rows_in_flight<VEC>([&](auto u) {
      launch(op, &reduce_r_kernel<T, VEC, decltype(u)::value, Policy>, lg.grid(), lg.block(), 0,
             global_ptr<T>(v.x), pol, lg.g);
    });
  }
  if (P > 1) {
    launch(op, &combine_partials_kernel<Policy>, grid_1d(v.N * L), dim3(256), 0, pol, v.N, P, L);
  }
}

template <typename T, typename Policy>
void reduction(const char* op, const XView& v, bool over_k, const Policy& pol) {
  constexpr int V = vec_width<T>();
  if (v.K() % V == 0 && aligned16(global_ptr<T>(v.x))) {
    run_reduction<T, V>(op, v, over_k, pol);
  } else {
    run_reduction<T, 1>(op, v, over_k, pol);
  }
}

// over_s: pool over S (scale [N, S], outputs [N, C]); else pool over C.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pool(const char* op, const at::Tensor& x_in,
                                                    const std::optional<at::Tensor>& scale_in,
                                                    bool over_s) {
  const c10::DeviceGuard device_guard(x_in.device());  // launches go to x's device
  const XView v = view_x(x_in, op, "x");
  const auto acc = acc_type_of(v.x.scalar_type());
  const int64_t E = over_s ? v.S : v.C, L = over_s ? v.C : v.S;
  const at::Tensor scale = small_arg(scale_in, v.x, v.N, E, acc, op, "scale",
                                     over_s ? "[N, S]" : "[N, C]");
  const auto opts = v.x.options().dtype(acc);
  at::Tensor avg = new_output({v.N, L}, opts);
  at::Tensor mx = new_output({v.N, L}, opts);
  at::Tensor arg = new_output({v.N, L}, opts.dtype(at::kLong));
  if (v.N == 0 || L == 0) return {avg, mx, arg};
  TORCH_CHECK(E > 0, op, ": x must have at least one ", over_s ? "spatial position" : "channel",
              " to pool over, got shape ", x_in.sizes());
  const bool over_k = over_s != v.cl;  // channels-first keeps S contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "cbam_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    PoolPolicy<acc_t> pol{};
    pol.scale = opt_ptr<acc_t>(scale);
    pol.E = E;
    pol.avg = global_ptr<acc_t>(avg);
    pol.mx = global_ptr<acc_t>(mx);
    pol.arg = global_ptr<int64_t>(arg);
    reduction<scalar_t>(op, v, over_k, pol);
  });
  return {avg, mx, arg};
}

// over_s: the scale gradient of pool_over_s ([N, S] = sum_c x (da/S + dm [s == is]), small
// tensors [N, C]); else of pool_over_c ([N, C] = sum_s x (du/C + dv [c == ic]), small [N, S]).
at::Tensor pool_backward_scale(const char* op, const at::Tensor& x_in,
                               const std::optional<at::Tensor>& d_avg_in,
                               const std::optional<at::Tensor>& d_max_in,
                               const std::optional<at::Tensor>& argmax_in, bool over_s) {
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
  at::Tensor out = new_output({v.N, E_fwd}, v.x.options().dtype(acc));
  if (out.numel() == 0) return out;
  if (L_fwd == 0) return out.zero_();
  const bool over_k = over_s == v.cl;  // reduces over the forward pool's kept axis
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "cbam_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    WeightedSumPolicy<acc_t> pol{};
    pol.wa = opt_ptr<acc_t>(d_avg);
    pol.wb = opt_ptr<acc_t>(d_max);
    pol.widx = opt_ptr<int64_t>(argmax);
    pol.E = L_fwd;
    pol.div = static_cast<acc_t>(E_fwd);
    pol.out = global_ptr<acc_t>(out);
    reduction<scalar_t>(op, v, over_k, pol);
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_over_s(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& scale) {
  return pool("pool_over_s", x, scale, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_over_c(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& scale) {
  return pool("pool_over_c", x, scale, false);
}

at::Tensor pool_over_s_backward_scale(const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
                                      const std::optional<at::Tensor>& d_max,
                                      const std::optional<at::Tensor>& argmax) {
  return pool_backward_scale("pool_over_s_backward_scale", x, d_avg, d_max, argmax, true);
}

at::Tensor pool_over_c_backward_scale(const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
                                      const std::optional<at::Tensor>& d_max,
                                      const std::optional<at::Tensor>& argmax) {
  return pool_backward_scale("pool_over_c_backward_scale", x, d_avg, d_max, argmax, false);
}

}  // namespace cbam
