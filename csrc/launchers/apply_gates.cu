// Launcher of apply_gates (kernels/apply_gates.cuh): y = x * gc * gs, one launch; y has the
// dtype of x and its (supported) memory format.
// Paths, by the row length K (the contiguous axis) and alignment: 16-byte vectors where K is a
// multiple of their width; else, rows folded G at a time (Fold, kernels/common.cuh) where R % G
// == 0, still 16-byte vectors (a 7x7 channels-first map of float32: 4 rows of 49, 49 vectors);
// else one element a load. Rows of at most kMaxSpanCols vectors take span lanes where they
// leave fewer threads idle (make_geom, SpanLanes::kIfFuller). grad_input.cu takes the same paths.
#include "kernels/apply_gates.cuh"
#include "launchers/common.h"

namespace cbam {
namespace {


template <typename T, int VEC, bool FOLD>
void run_apply_gates(const XView& v, const at::Tensor& y, const at::Tensor& gc,
                     const at::Tensor& gs, int G) {
  using acc_t = at::opmath_type<T>;
  LaunchGeom lg = folded_geom(v, G, VEC, 1, sizeof(acc_t), 0, sizeof(T), "apply_gates",
                              SpanLanes::kIfFuller);
  lg.g.reverse = next_pass_reversed({&v.x, &y});
  const Fold f = fold_of(v, G);
  const acc_t* gr = opt_ptr<acc_t>(v.cl ? gs : gc);
  const acc_t* gk = opt_ptr<acc_t>(v.cl ? gc : gs);
  with_rows_in_flight<VEC>(lg.tune, [&](auto u) {
    launch("apply_gates", &apply_gates_kernel<T, VEC, decltype(u)::value, FOLD, acc_t>,
           lg.grid(), lg.block(), 0, global_ptr<T>(v.x), global_ptr<T>(y), gr, gk, lg.g, f, v.cl);
  });
}

}  // namespace

at::Tensor apply_gates(const at::Tensor& x_in, const std::optional<at::Tensor>& gc_in,
                       const std::optional<at::Tensor>& gs_in) {
  const char* op = "apply_gates";
  const c10::DeviceGuard device_guard(x_in.device());  // launches go to x's device
  const XView v = view_x(x_in, op, "x");
  const auto acc = acc_type_of(v.x.scalar_type());
  const at::Tensor gc = small_arg(gc_in, v.x, v.N, v.C, acc, op, "gc", "[N, C]");
  const at::Tensor gs = small_arg(gs_in, v.x, v.N, v.S, acc, op, "gs", "[N, S]");
  at::Tensor y = new_like(v);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "cbam_fused", [&] {
    constexpr int V = vec_width<scalar_t>();
    const bool aligned = aligned16(v.x.data_ptr()) && aligned16(y.data_ptr());
    const int G = aligned ? fold_rows(v, V) : 0;
    if (G == 1) {
      run_apply_gates<scalar_t, V, false>(v, y, gc, gs, 1);
    } else if (G > 1) {
      run_apply_gates<scalar_t, V, true>(v, y, gc, gs, G);
    } else {
      run_apply_gates<scalar_t, 1, false>(v, y, gc, gs, 1);
    }
  });
  return y;
}

}  // namespace cbam
