// What both channel-head launchers share (channel_head.cu and channel_head_backward.cu): the
// pools and activation arguments, the parameters' checks (the Python checks in
// cbam_fused/_cpu_kernels.py print the same messages), the split of the c axis.
#pragma once

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kernels/channel_head.cuh"
#include "launchers/common.h"
#include "launchers/spatial_head_common.h"
#include "pools_string.h"

namespace cbam {

// The pools of a `pools` string in summation order (indices into avg, max, lp, lse), or {0, 1}
// with *blend for "blend". The Python check (_cpu_kernels.check_channel_head) says the same.
inline std::vector<int> channel_pool_order(const std::string& pools, bool* blend,
                                           const char* op) {
  *blend = pools == "blend";
  if (*blend) return {0, 1};
  static const char* const kNames[] = {"avg", "max", "lp", "lse"};
  std::vector<int> order;
  bool ok = true;
  for (const std::string& name : split_pools(pools)) {
    int idx = -1;
    for (int i = 0; i < kMaxChannelPools; ++i) {
      if (name == kNames[i]) idx = i;
    }
    for (int seen : order) ok = ok && seen != idx;
    ok = ok && idx >= 0;
    if (ok) order.push_back(idx);
  }
  TORCH_CHECK(ok, op, ": pools must be 'blend' or distinct names of avg, max, lp, lse joined by "
              "'+', got '", pools, "'");
  return order;
}

inline int head_act_of(const std::string& act, const char* op) {
  TORCH_CHECK(act == "relu" || act == "silu" || act == "gelu" || act == "identity", op,
              ": act must be 'relu', 'silu', 'gelu' or 'identity', got '", act, "'");
  return act == "relu" ? kActRelu : act == "silu" ? kActSilu : act == "gelu" ? kActGelu
                                                                              : kActIdentity;
}

// A 1-D or 2-D tensor argument of a head op with the given sizes, on the device and in the dtype
// of `ref` (named ref_name); contiguous, undefined when absent.
inline at::Tensor head_param(const std::optional<at::Tensor>& t, const at::Tensor& ref,
                             const char* ref_name, std::vector<int64_t> want, const char* op,
                             const char* arg, const char* shape) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_like_head(*t, ref, op, arg, ref_name);
  TORCH_CHECK(t->sizes() == at::IntArrayRef(want), op, ": ", arg, " must have shape ", shape,
              " = ", at::IntArrayRef(want), ", got ", t->sizes());
  return t->contiguous();
}

// (splits, chunks a split) of a c axis of C columns for a grid of `tiles` tiles: whole chunks of
// kHeadTile columns, at least 4 a split, split only while the tiles alone give fewer blocks than
// SMs. Debug tile modes (tests): 1, one split; 2, a chunk a split.
inline std::pair<int64_t, int64_t> head_c_splits(int64_t tiles, int64_t C) {
  const int64_t chunks = ceil_div(C, kHeadTile);
  int64_t splits =
      std::min(ceil_div(num_sms(), std::max<int64_t>(tiles, 1)), std::max<int64_t>(1, chunks / 4));
  if (debug::tile_mode == 1) splits = 1;
  if (debug::tile_mode == 2) splits = std::max<int64_t>(1, chunks);
  splits = std::min<int64_t>(std::max<int64_t>(splits, 1), 65535);
  const int64_t chunks_per_split = std::max<int64_t>(1, ceil_div(chunks, splits));
  return {std::max<int64_t>(1, ceil_div(chunks, chunks_per_split)), chunks_per_split};
}

// A grid-stride launch over `total` elements: one element a thread, at most 16 blocks an SM.
inline dim3 head_stride_blocks(int64_t total) {
  return dim3(static_cast<unsigned>(
      std::min<int64_t>(ceil_div(total, kBlockThreads), static_cast<int64_t>(num_sms()) * 16)));
}

}  // namespace cbam
