// Launchers of grad_input and grad_input_lp_lse, Q3 (kernels/grad_input.cuh): dx written once
// from grad, x (the lp / lse terms only) and the small tensors, one launch; dx has the dtype of
// grad and its (supported) memory format. Paths as apply_gates' (launchers/apply_gates.cu):
// 16-byte vectors, rows folded into whole vectors, or one element a load.
#include <type_traits>

#include "kernels/grad_input.cuh"
#include "launchers/common.h"

namespace cbam {
namespace {

template <typename T, int VEC, bool LPLSE, bool FOLD>
void run_grad_input(const char* op, const XView& v, const at::Tensor& x, const at::Tensor& dx,
                    const GradSidePtrs<at::opmath_type<T>>& cs,
                    const GradSidePtrs<at::opmath_type<T>>& ss, int arrangement, int G) {
  using acc_t = at::opmath_type<T>;
  // the global bytes behind a column's GradSide: the index is read as int64, and lp with dlp
  const int64_t staged = static_cast<int64_t>(sizeof(GradSide<acc_t, LPLSE>)) + 4 +
                         (LPLSE ? static_cast<int64_t>(sizeof(acc_t)) : 0);
  LaunchGeom lg = folded_geom(v, G, VEC, 1, staged, 0, sizeof(T), op, SpanLanes::kIfFuller);
  lg.g.reverse = next_pass_reversed({&v.x, &x, &dx});
  const Fold f = fold_of(v, G);
  const T* xp = LPLSE ? global_ptr<T>(x) : nullptr;
  // the form of dx as a template parameter, but for lp / lse and 16-bit folded rows (kAnyMode)
  const auto with_mode = [&](auto f_mode) {
    if constexpr (!grad_input_takes_forms<LPLSE, FOLD, VEC>()) {
      f_mode(std::integral_constant<int, kAnyMode>{});
    } else {
      switch (grad_input_mode(v.cl, arrangement)) {
        case 0:
          return f_mode(std::integral_constant<int, 0>{});
        case 1:
          return f_mode(std::integral_constant<int, 1>{});
        default:
          return f_mode(std::integral_constant<int, 2>{});
      }
    }
  };
  with_rows_in_flight<VEC>(lg.tune, [&](auto u) {
    with_mode([&](auto mode) {
      launch(op,
             &grad_input_kernel<T, VEC, decltype(u)::value, LPLSE, FOLD, decltype(mode)::value,
                                acc_t>,
             lg.grid(), lg.block(), 0, global_ptr<T>(v.x), xp, global_ptr<T>(dx),
             v.cl ? ss : cs, v.cl ? cs : ss, lg.g, f, v.cl, arrangement);
    });
  });
}

// The lp / lse pools' inputs of grad_input_lp_lse ([N, C] each), absent for grad_input.
struct LpLseGrads {
  std::optional<at::Tensor> x, d_lp, lp, d_lse, lse;
};

at::Tensor grad_input_impl(const char* op, const at::Tensor& grad_in,
                           const std::optional<at::Tensor>& gc_in,
                           const std::optional<at::Tensor>& gs_in,
                           const std::optional<at::Tensor>& da_in,
                           const std::optional<at::Tensor>& dm_in,
                           const std::optional<at::Tensor>& idx_s_in,
                           const std::optional<at::Tensor>& du_in,
                           const std::optional<at::Tensor>& dv_in,
                           const std::optional<at::Tensor>& idx_c_in, int64_t arrangement,
                           const LpLseGrads* ext) {
  const c10::DeviceGuard device_guard(grad_in.device());
  TORCH_CHECK(arrangement >= 0 && arrangement <= 2, op,
              ": arrangement must be 0 (channel first), 1 (spatial first) or 2 (parallel), got ",
              arrangement);
  const XView v = view_x(grad_in, op, "grad");
  const auto acc = acc_type_of(v.x.scalar_type());
  const at::Tensor gc = small_arg(gc_in, v.x, v.N, v.C, acc, op, "gc", "[N, C]");
  const at::Tensor gs = small_arg(gs_in, v.x, v.N, v.S, acc, op, "gs", "[N, S]");
  const at::Tensor da = small_arg(da_in, v.x, v.N, v.C, acc, op, "da", "[N, C]");
  const at::Tensor dm = small_arg(dm_in, v.x, v.N, v.C, acc, op, "dm", "[N, C]");
  const at::Tensor is = small_arg(idx_s_in, v.x, v.N, v.C, at::kLong, op, "idx_s", "[N, C]");
  const at::Tensor du = small_arg(du_in, v.x, v.N, v.S, acc, op, "du", "[N, S]");
  const at::Tensor dv = small_arg(dv_in, v.x, v.N, v.S, acc, op, "dv", "[N, S]");
  const at::Tensor ic = small_arg(idx_c_in, v.x, v.N, v.S, at::kLong, op, "idx_c", "[N, S]");
  TORCH_CHECK(!dm.defined() || is.defined(), op, ": dm needs idx_s");
  TORCH_CHECK(!dv.defined() || ic.defined(), op, ": dv needs idx_c");
  at::Tensor x, d_lp, lp, d_lse, lse;
  if (ext != nullptr) {
    TORCH_CHECK(ext->x.has_value() && ext->x->defined(), op, ": x is required");
    x = like_x(*ext->x, v, grad_in, op, "x", "grad");  // in grad's (supported) layout
    d_lp = small_arg(ext->d_lp, v.x, v.N, v.C, acc, op, "d_lp", "[N, C]");
    lp = small_arg(ext->lp, v.x, v.N, v.C, acc, op, "lp", "[N, C]");
    d_lse = small_arg(ext->d_lse, v.x, v.N, v.C, acc, op, "d_lse", "[N, C]");
    lse = small_arg(ext->lse, v.x, v.N, v.C, acc, op, "lse", "[N, C]");
    TORCH_CHECK(!d_lp.defined() || lp.defined(), op, ": d_lp needs lp");
    TORCH_CHECK(!d_lse.defined() || lse.defined(), op, ": d_lse needs lse");
  }
  at::Tensor dx = new_like(v);
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "cbam_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GradSidePtrs<acc_t> cs{opt_ptr<acc_t>(gc), opt_ptr<acc_t>(da), opt_ptr<acc_t>(dm),
                           opt_ptr<int64_t>(is), v.C, static_cast<acc_t>(v.S)};
    GradSidePtrs<acc_t> ss{opt_ptr<acc_t>(gs), opt_ptr<acc_t>(du), opt_ptr<acc_t>(dv),
                           opt_ptr<int64_t>(ic), v.S, static_cast<acc_t>(v.C)};
    cs.dlp = opt_ptr<acc_t>(d_lp);
    cs.lp = opt_ptr<acc_t>(lp);
    cs.dlse = opt_ptr<acc_t>(d_lse);
    cs.lse = opt_ptr<acc_t>(lse);
    constexpr int V = vec_width<scalar_t>();
    const int arr = static_cast<int>(arrangement);
    const bool aligned = aligned16(v.x.data_ptr()) && aligned16(dx.data_ptr()) &&
                         (!x.defined() || aligned16(x.data_ptr()));
    const int G = aligned ? fold_rows(v, V) : 0;
    const auto run = [&](auto lp_lse) {
      constexpr bool kLpLse = decltype(lp_lse)::value;
      if (G == 1) {
        run_grad_input<scalar_t, V, kLpLse, false>(op, v, x, dx, cs, ss, arr, 1);
      } else if (G > 1) {
        run_grad_input<scalar_t, V, kLpLse, true>(op, v, x, dx, cs, ss, arr, G);
      } else {
        run_grad_input<scalar_t, 1, kLpLse, false>(op, v, x, dx, cs, ss, arr, 1);
      }
    };
    ext != nullptr ? run(std::true_type{}) : run(std::false_type{});
  });
  return dx;
}

}  // namespace

at::Tensor grad_input(const at::Tensor& grad, const std::optional<at::Tensor>& gc,
                      const std::optional<at::Tensor>& gs, const std::optional<at::Tensor>& da,
                      const std::optional<at::Tensor>& dm, const std::optional<at::Tensor>& idx_s,
                      const std::optional<at::Tensor>& du, const std::optional<at::Tensor>& dv,
                      const std::optional<at::Tensor>& idx_c, int64_t arrangement) {
  return grad_input_impl("grad_input", grad, gc, gs, da, dm, idx_s, du, dv, idx_c, arrangement,
                         nullptr);
}

at::Tensor grad_input_lp_lse(const at::Tensor& grad, const at::Tensor& x,
                             const std::optional<at::Tensor>& gc,
                             const std::optional<at::Tensor>& gs,
                             const std::optional<at::Tensor>& da,
                             const std::optional<at::Tensor>& dm,
                             const std::optional<at::Tensor>& idx_s,
                             const std::optional<at::Tensor>& du,
                             const std::optional<at::Tensor>& dv,
                             const std::optional<at::Tensor>& idx_c,
                             const std::optional<at::Tensor>& d_lp,
                             const std::optional<at::Tensor>& lp,
                             const std::optional<at::Tensor>& d_lse,
                             const std::optional<at::Tensor>& lse, int64_t arrangement) {
  const LpLseGrads ext{x, d_lp, lp, d_lse, lse};
  return grad_input_impl("grad_input_lp_lse", grad, gc, gs, da, dm, idx_s, du, dv, idx_c,
                         arrangement, &ext);
}

}  // namespace cbam
