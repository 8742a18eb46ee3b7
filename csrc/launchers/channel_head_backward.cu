// Launcher of the channel gate's head backward (kernels/channel_head_backward.cuh): checks,
// outputs, the split of the c axis, one or two launches.
#include <string>
#include <vector>

#include "kernels/channel_head_backward.cuh"
#include "launchers/channel_head_common.h"

namespace cbam {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_head_backward(
    const at::Tensor& dzc_in, const at::Tensor& p_in, const at::Tensor& h_in,
    const at::Tensor& w1_in, const std::optional<at::Tensor>& w2_in, bool has_b1, bool has_b2,
    c10::string_view pools_in, c10::string_view act_in) {
  constexpr const char* op = "channel_head_backward";
  const c10::DeviceGuard device_guard(dzc_in.device());
  bool blend = false;
  const std::vector<int> order = channel_pool_order(std::string(pools_in), &blend, op);
  const int act = head_act_of(std::string(act_in), op);
  TORCH_CHECK(dzc_in.dim() == 2, op, ": dzc must have shape [N, C], got ", dzc_in.sizes());
  TORCH_CHECK(dzc_in.scalar_type() == at::kFloat || dzc_in.scalar_type() == at::kDouble, op,
              ": dzc must be float32 or float64 (the accumulation dtype), got ",
              dzc_in.scalar_type());
  const int64_t N = dzc_in.size(0), C = dzc_in.size(1);
  const int k = blend ? 1 : static_cast<int>(order.size());
  const int64_t R = k * N;
  TORCH_CHECK(w1_in.dim() == 2 && w1_in.size(1) == C, op, ": w1 must have shape [H, C] with C = ",
              C, ", got ", w1_in.sizes());
  const int64_t H = w1_in.size(0);
  const at::Tensor w1 = head_param(w1_in, dzc_in, "dzc", {H, C}, op, "w1", "[H, C]");
  const at::Tensor p = head_param(p_in, dzc_in, "dzc", {R, C}, op, "p", "[k N, C]");
  const at::Tensor h = head_param(h_in, dzc_in, "dzc", {R, H}, op, "h", "[k N, H]");
  const at::Tensor w2 = head_param(w2_in, dzc_in, "dzc", {C, H}, op, "w2", "[C, H]");
  const bool mlp = w2.defined();
  TORCH_CHECK(mlp || H == C, op, ": w1 must have shape [C, C] = [", C, ", ", C,
              "] without w2 (one layer), got ", w1_in.sizes());
  TORCH_CHECK(mlp || !has_b2, op, ": has_b2 needs w2");
  TORCH_CHECK(ceil_div(H, kHeadTile) <= max_grid_y(), op, ": at most ",
              static_cast<int64_t>(max_grid_y()) * kHeadTile, " hidden units are supported, got ",
              H);

  const auto opts = dzc_in.options();
  const at::Tensor dzc = dzc_in.contiguous();
  at::Tensor dp = new_output({R, C}, opts), dw1 = new_output({H, C}, opts);
  at::Tensor db1 = has_b1 ? new_output({H}, opts) : at::empty({0}, opts);
  at::Tensor dw2 = mlp ? new_output({C, H}, opts) : at::empty({0}, opts);
  at::Tensor db2 = has_b2 ? new_output({C}, opts) : at::empty({0}, opts);
  const at::Tensor dh = mlp ? at::empty({R, H}, opts) : at::Tensor();
  const std::pair<int64_t, int64_t> split =  // (no structured bindings: see channel_head.cu)
      head_c_splits(ceil_div(N, kHeadTile) * std::max<int64_t>(1, ceil_div(H, kHeadTile)), C);
  const int64_t splits = split.first, chunks_per_split = split.second;
  const at::Tensor partial =
      mlp && splits > 1 ? new_output({splits, N, H}, opts) : at::Tensor();
  std::vector<at::Tensor> keep;  // the tiles' counters (kernels/combine_partials.cuh)
  const int64_t tiles = ceil_div(N, kHeadTile) * std::max<int64_t>(1, ceil_div(H, kHeadTile));
  int* const counters = partial.defined() ? group_counters(dzc, tiles, keep) : nullptr;

  AT_DISPATCH_FLOATING_TYPES(dzc.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    ChannelHeadBwdArgs<acc_t> a;
    a.dzc = global_ptr<acc_t>(dzc);
    a.p = global_ptr<acc_t>(p);
    a.h = global_ptr<acc_t>(h);
    a.w1 = global_ptr<acc_t>(w1);
    a.w2 = opt_ptr<acc_t>(w2);
    a.N = N;
    a.C = C;
    a.H = H;
    a.R = R;
    a.k = k;
    a.blend = blend;
    a.act = act;
    a.store_act = mlp && act == kActRelu;  // _heads.saves_activated
    a.split_cols = chunks_per_split * kHeadTile;
    a.dh = mlp ? global_ptr<acc_t>(dh) : nullptr;
    a.partial = partial.defined() ? global_ptr<acc_t>(partial) : nullptr;
    a.counters = counters;
    a.dp = global_ptr<acc_t>(dp);
    a.dw1 = global_ptr<acc_t>(dw1);
    a.db1 = has_b1 ? global_ptr<acc_t>(db1) : nullptr;
    a.dw2 = mlp ? global_ptr<acc_t>(dw2) : nullptr;
    a.db2 = has_b2 ? global_ptr<acc_t>(db2) : nullptr;
    const int64_t tc = ceil_div(C, kHeadTile), th = ceil_div(H, kHeadTile);
    a.seg[0] = 0;
    a.seg[1] = a.seg[0] + (mlp ? tc * th : 0);                          // dW2
    a.seg[2] = a.seg[1] + th * tc;                                      // dW1
    a.seg[3] = a.seg[2] + ceil_div(R, kHeadTile) * tc;                  // dP
    a.seg[4] = a.seg[3] + (has_b1 ? ceil_div(H, kBlockThreads) : 0);    // db1
    a.seg[5] = a.seg[4] + (has_b2 ? ceil_div(C, kBlockThreads) : 0);    // db2
    if (mlp && N * H > 0) {
      const dim3 grid(static_cast<unsigned>(ceil_div(N, kHeadTile)), static_cast<unsigned>(th),
                      static_cast<unsigned>(splits));
      if (splits == 1) {
        launch(op, &channel_head_bwd_hidden_kernel<acc_t, true>, grid, dim3(kBlockThreads), 0, a);
      } else {
        // (each tile's last split to finish adds the partials: no second launch)
        launch(op, &channel_head_bwd_hidden_kernel<acc_t, false>, grid, dim3(kBlockThreads), 0,
               a);
      }
    }
    if (a.seg[5] == 0) return;
    TORCH_CHECK(a.seg[5] <= std::numeric_limits<int32_t>::max(), op, ": ", a.seg[5],
                " blocks for the parameters' gradients, more than a grid holds (C = ", C,
                ", H = ", H, ")");
    const dim3 grid(static_cast<unsigned>(a.seg[5]));
    if (mlp) {
      launch(op, &channel_head_bwd_params_kernel<acc_t, true>, grid, dim3(kBlockThreads), 0, a);
    } else {
      launch(op, &channel_head_bwd_params_kernel<acc_t, false>, grid, dim3(kBlockThreads), 0, a);
    }
  });
  return {dp, dw1, db1, dw2, db2};
}

}  // namespace cbam
