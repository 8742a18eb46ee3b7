// Launchers of the spatial gate's BatchNorm with batch statistics and sigmoid
// (kernels/batch_norm_gate.cuh), forward and backward: checks, outputs, two launches each.
#include <string>

#include "kernels/batch_norm_gate.cuh"
#include "launchers/common.h"
#include "launchers/spatial_head_common.h"

namespace cbam {
namespace {

// zconv [N, 1, *spatial] (1 to 3 spatial dimensions) in the accumulation dtype, more than one
// value. Returns M = N S.
int64_t check_bn_zconv(const at::Tensor& z, const char* op) {
  const int64_t nd = z.dim() - 2;
  TORCH_CHECK(nd >= 1 && nd <= 3 && z.size(1) == 1, op,
              ": zconv must have shape [N, 1, *spatial] with 1 to 3 spatial dimensions, got ",
              z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op,
              ": zconv must be float32 or float64 (the accumulation dtype), got ",
              z.scalar_type());
  TORCH_CHECK(z.numel() > 1, op,
              ": zconv must hold more than 1 value (batch statistics), got shape ", z.sizes());
  return z.numel();
}

// Blocks of the partials kernels: ranges of at least 4 values a thread, at most 2 blocks an SM
// (the apply kernels' blocks each fold all P partials). debug tile modes (tests): 1, one block
// each; 2, ranges of 16 values (hundreds of partials on small maps).
int64_t bn_partial_blocks(int64_t M) {
  if (debug::tile_mode == 1) return 1;
  if (debug::tile_mode == 2) return ceil_div(M, 16);
  return std::min<int64_t>(ceil_div(M, 4 * kBlockThreads), static_cast<int64_t>(num_sms()) * 2);
}

// Blocks of the apply kernels (grid-stride loops over M).
int64_t bn_apply_blocks(int64_t M) {
  if (debug::tile_mode == 1) return 1;
  return std::min<int64_t>(ceil_div(M, kBlockThreads), static_cast<int64_t>(num_sms()) * 4);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_gate(
    const at::Tensor& z_in, const std::optional<at::Tensor>& bn_w_in,
    const std::optional<at::Tensor>& bn_b_in, double bn_eps) {
  constexpr const char* op = "batch_norm_gate";
  const c10::DeviceGuard device_guard(z_in.device());
  const int64_t M = check_bn_zconv(z_in, op);
  const at::Tensor bn_w = head_scalar(bn_w_in, z_in, op, "bn_w", "zconv");
  const at::Tensor bn_b = head_scalar(bn_b_in, z_in, op, "bn_b", "zconv");
  const at::Tensor z = z_in.contiguous();
  const auto opts = z.options();
  at::Tensor gs = new_output({z.size(0), M / z.size(0)}, opts);
  at::Tensor mean = new_output({1}, opts), invstd = new_output({1}, opts);
  at::Tensor var = new_output({1}, opts);
  const int64_t P = bn_partial_blocks(M);
  const at::Tensor partials = at::empty({3, P}, opts);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    BatchNormGateArgs<acc_t> a;
    a.z = global_ptr<acc_t>(z);
    a.M = M;
    a.partials = global_ptr<acc_t>(partials);
    a.P = P;
    a.bn_w = opt_ptr<acc_t>(bn_w);
    a.bn_b = opt_ptr<acc_t>(bn_b);
    a.eps = static_cast<acc_t>(bn_eps);
    a.gs = global_ptr<acc_t>(gs);
    a.mean = global_ptr<acc_t>(mean);
    a.invstd = global_ptr<acc_t>(invstd);
    a.var = global_ptr<acc_t>(var);
    launch(op, &batch_norm_gate_partials_kernel<acc_t>, dim3(static_cast<unsigned>(P)),
           dim3(kBlockThreads), 0, a.z, M, global_ptr<acc_t>(partials));
    launch(op, &batch_norm_gate_apply_kernel<acc_t>,
           dim3(static_cast<unsigned>(bn_apply_blocks(M))), dim3(kBlockThreads), 0, a);
  });
  return {gs, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_gate_backward(
    const at::Tensor& dgs_in, const at::Tensor& gs_in, const at::Tensor& z_in,
    const at::Tensor& mean_in, const at::Tensor& invstd_in,
    const std::optional<at::Tensor>& bn_w_in, bool has_b) {
  constexpr const char* op = "batch_norm_gate_backward";
  const c10::DeviceGuard device_guard(z_in.device());
  const int64_t M = check_bn_zconv(z_in, op);
  const int64_t N = z_in.size(0);
  const auto check_map = [&](const at::Tensor& t, const char* name) {  // [N, S] like zconv
    check_like_head(t, z_in, op, name, "zconv");
    TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == M / N, op, ": ", name,
                " must have shape [", N, ", ", M / N, "], got ", t.sizes());
  };
  check_map(dgs_in, "dgs");
  check_map(gs_in, "gs");
  const at::Tensor mean = head_scalar(mean_in, z_in, op, "mean", "zconv");
  const at::Tensor invstd = head_scalar(invstd_in, z_in, op, "invstd", "zconv");
  const at::Tensor bn_w = head_scalar(bn_w_in, z_in, op, "bn_w", "zconv");
  const at::Tensor dgs = dgs_in.contiguous(), gs = gs_in.contiguous(), z = z_in.contiguous();
  const auto opts = z.options();
  at::Tensor dz = new_output({N, M / N}, opts);
  at::Tensor dbn_w = bn_w.defined() ? new_output({1}, opts) : at::empty({0}, opts);
  at::Tensor dbn_b = has_b ? new_output({1}, opts) : at::empty({0}, opts);
  const int64_t P = bn_partial_blocks(M);
  const at::Tensor partials = at::empty({2, P}, opts);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    BatchNormGateBackwardArgs<acc_t> a;
    a.dgs = global_ptr<acc_t>(dgs);
    a.gs = global_ptr<acc_t>(gs);
    a.z = global_ptr<acc_t>(z);
    a.M = M;
    a.mean = global_ptr<acc_t>(mean);
    a.invstd = global_ptr<acc_t>(invstd);
    a.bn_w = opt_ptr<acc_t>(bn_w);
    a.partials = global_ptr<acc_t>(partials);
    a.P = P;
    a.dz = global_ptr<acc_t>(dz);
    a.dbn_w = dbn_w.numel() > 0 ? global_ptr<acc_t>(dbn_w) : nullptr;
    a.dbn_b = dbn_b.numel() > 0 ? global_ptr<acc_t>(dbn_b) : nullptr;
    launch(op, &batch_norm_gate_backward_partials_kernel<acc_t>, dim3(static_cast<unsigned>(P)),
           dim3(kBlockThreads), 0, a, global_ptr<acc_t>(partials));
    launch(op, &batch_norm_gate_backward_apply_kernel<acc_t>,
           dim3(static_cast<unsigned>(bn_apply_blocks(M))), dim3(kBlockThreads), 0, a);
  });
  return {dz, dbn_w, dbn_b};
}

}  // namespace cbam
