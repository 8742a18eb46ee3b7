// Launcher of the channel gate's head (kernels/channel_head.cuh): checks, outputs, the split of
// the c axis, two launches.
#include <string>
#include <vector>

#include "kernels/channel_head.cuh"
#include "launchers/channel_head_common.h"

namespace cbam {

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_head(
    const at::Tensor& avg_in, const at::Tensor& max_in, const std::optional<at::Tensor>& lp_in,
    const std::optional<at::Tensor>& lse_in, const at::Tensor& w1_in,
    const std::optional<at::Tensor>& b1_in, const std::optional<at::Tensor>& w2_in,
    const std::optional<at::Tensor>& b2_in, c10::string_view pools_in, c10::string_view act_in) {
  constexpr const char* op = "channel_head";
  const c10::DeviceGuard device_guard(avg_in.device());
  bool blend = false;
  const std::vector<int> order = channel_pool_order(std::string(pools_in), &blend, op);
  const int act = head_act_of(std::string(act_in), op);
  TORCH_CHECK(avg_in.dim() == 2, op, ": avg must have shape [N, C], got ", avg_in.sizes());
  TORCH_CHECK(avg_in.scalar_type() == at::kFloat || avg_in.scalar_type() == at::kDouble, op,
              ": avg must be float32 or float64 (the accumulation dtype), got ",
              avg_in.scalar_type());
  const int64_t N = avg_in.size(0), C = avg_in.size(1);
  const char* names[kMaxChannelPools] = {"avg", "max", "lp", "lse"};
  const std::optional<at::Tensor> given[kMaxChannelPools] = {avg_in, max_in, lp_in, lse_in};
  at::Tensor pool[kMaxChannelPools];
  for (int i = 0; i < kMaxChannelPools; ++i) {
    if (!given[i].has_value() || !given[i]->defined()) continue;
    check_like_head(*given[i], avg_in, op, names[i], "avg");
    TORCH_CHECK(given[i]->sizes() == avg_in.sizes(), op, ": ", names[i],
                " must have the shape of avg ", avg_in.sizes(), ", got ", given[i]->sizes());
    pool[i] = given[i]->contiguous();
  }
  for (int i : order) {
    TORCH_CHECK(pool[i].defined(), op, ": pools '", std::string(pools_in), "' need ", names[i]);
  }
  TORCH_CHECK(w1_in.dim() == 2 && w1_in.size(1) == C, op, ": w1 must have shape [H, C] with C = ",
              C, ", got ", w1_in.sizes());
  const int64_t H = w1_in.size(0);
  const at::Tensor w1 = head_param(w1_in, avg_in, "avg", {H, C}, op, "w1", "[H, C]");
  const at::Tensor b1 = head_param(b1_in, avg_in, "avg", {H}, op, "b1", "[H]");
  const at::Tensor w2 = head_param(w2_in, avg_in, "avg", {C, H}, op, "w2", "[C, H]");
  const at::Tensor b2 = head_param(b2_in, avg_in, "avg", {C}, op, "b2", "[C]");
  TORCH_CHECK(w2.defined() || H == C, op, ": w1 must have shape [C, C] = [", C, ", ", C,
              "] without w2 (one layer), got ", w1_in.sizes());
  TORCH_CHECK(w2.defined() || !b2.defined(), op, ": b2 needs w2");
  TORCH_CHECK(ceil_div(C, kHeadTile) <= max_grid_y() && ceil_div(H, kHeadTile) <= max_grid_y(),
              op, ": at most ", static_cast<int64_t>(max_grid_y()) * kHeadTile,
              " channels and hidden units are supported, got C = ", C, ", H = ", H);

  const int k = blend ? 1 : static_cast<int>(order.size());
  const int64_t R = k * N;
  const auto opts = avg_in.options();
  at::Tensor gc = new_output({N, C}, opts), p = new_output({R, C}, opts);
  at::Tensor h = new_output({R, H}, opts);
  if (N == 0) return {gc, p, h};

  // (no structured bindings: the dispatch lambda captures them, C++20 only, and nvcc builds
  // against older torch take -std=c++17)
  const std::pair<int64_t, int64_t> split = head_c_splits(
      ceil_div(R, kHeadTile) * std::max<int64_t>(1, ceil_div(H, kHeadTile)), C);
  const int64_t splits = split.first, chunks_per_split = split.second;
  const at::Tensor partial = splits > 1 ? new_output({splits, R, H}, opts) : at::Tensor();
  const int64_t tiles = ceil_div(R, kHeadTile) * std::max<int64_t>(1, ceil_div(H, kHeadTile));
  std::vector<at::Tensor> keep;  // the tiles' counters (kernels/combine_partials.cuh)
  int* const counters = splits > 1 ? group_counters(avg_in, tiles, keep) : nullptr;

  AT_DISPATCH_FLOATING_TYPES(avg_in.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    ChannelHeadArgs<acc_t> a;
    for (int i = 0; i < kMaxChannelPools; ++i) a.pools[i] = nullptr;
    for (size_t i = 0; i < order.size(); ++i) a.pools[i] = global_ptr<acc_t>(pool[order[i]]);
    a.k = k;
    a.blend = blend;
    a.N = N;
    a.C = C;
    a.H = H;
    a.R = R;
    a.w1 = global_ptr<acc_t>(w1);
    a.b1 = opt_ptr<acc_t>(b1);
    a.w2 = opt_ptr<acc_t>(w2);
    a.b2 = opt_ptr<acc_t>(b2);
    a.act = act;
    a.store_act = w2.defined() && act == kActRelu;  // _heads.saves_activated
    a.split_cols = chunks_per_split * kHeadTile;
    a.p = global_ptr<acc_t>(p);
    a.h = global_ptr<acc_t>(h);
    a.partial = splits > 1 ? global_ptr<acc_t>(partial) : nullptr;
    a.counters = counters;
    a.gc = global_ptr<acc_t>(gc);
    const dim3 hidden_grid(static_cast<unsigned>(ceil_div(R, kHeadTile)),
                           static_cast<unsigned>(std::max<int64_t>(1, ceil_div(H, kHeadTile))),
                           static_cast<unsigned>(splits));
    if (splits == 1) {
      launch(op, &channel_head_hidden_kernel<acc_t, true>, hidden_grid, dim3(kBlockThreads), 0,
             a);
    } else {
      // (each tile's last split to finish adds the partials: no second launch)
      launch(op, &channel_head_hidden_kernel<acc_t, false>, hidden_grid, dim3(kBlockThreads), 0,
             a);
    }
    if (C == 0) return;
    if (w2.defined()) {
      const dim3 gate_grid(static_cast<unsigned>(ceil_div(N, kHeadTile)),
                           static_cast<unsigned>(ceil_div(C, kHeadTile)));
      launch(op, &channel_head_gate_kernel<acc_t, true>, gate_grid, dim3(kBlockThreads), 0, a);
    } else {
      launch(op, &channel_head_gate_kernel<acc_t, false>, head_stride_blocks(N * C),
             dim3(kBlockThreads), 0, a);
    }
  });
  return {gc, p, h};
}

}  // namespace cbam
