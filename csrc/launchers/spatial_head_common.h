// What both spatial-head launchers share (spatial_head.cu and spatial_head_backward.cu): the
// argument checks (the map order, the conv weights, the [1] parameters; the Python checks in
// cbam_fused/_cpu_kernels.py print the same messages), the geometry and the block size.
#pragma once

#include <optional>
#include <string>

#include "kernels/spatial_head.cuh"
#include "launchers/common.h"

namespace cbam {

// 0: "max,mean", 1: "mean,max", 2: "blend".
inline int head_order(const std::string& order, const char* op) {
  TORCH_CHECK(order == "max,mean" || order == "mean,max" || order == "blend", op,
              ": spatial_pools must be 'max,mean', 'mean,max' or 'blend', got '", order, "'");
  return order == "max,mean" ? 0 : order == "mean,max" ? 1 : 2;
}

// A tensor argument on the device and in the dtype of `ref` (named ref_name).
inline void check_like_head(const at::Tensor& t, const at::Tensor& ref, const char* op,
                            const char* arg, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// conv_w of a head on `nd` spatial dimensions with `cin` input channels: [1, cin, k, ...] with an
// odd k and at most kMaxHeadTaps weights. Returns k.
inline int64_t check_head_conv_w(const at::Tensor& w, const at::Tensor& ref, int64_t nd, int cin,
                                 const char* op, const char* ref_name) {
  check_like_head(w, ref, op, "conv_w", ref_name);
  bool cubic = w.dim() == nd + 2 && w.size(0) == 1 && w.size(1) == cin;
  const int64_t k = cubic ? w.size(-1) : 0;
  for (int64_t d = 2; cubic && d < w.dim(); ++d) cubic = w.size(d) == k;
  TORCH_CHECK(cubic && k % 2 == 1, op, ": conv_w must have shape [1, ", cin, ", k",
              (nd > 1 ? ", k" : ""), (nd > 2 ? ", k" : ""), "] with an odd k, got ", w.sizes());
  int64_t taps = cin;
  for (int64_t d = 0; d < nd; ++d) taps *= k;
  TORCH_CHECK(taps <= kMaxHeadTaps, op, ": conv_w has ", taps, " weights, at most ", kMaxHeadTaps,
              " are supported");
  return k;
}

// A [1] parameter of the head, checked; undefined when absent.
inline at::Tensor head_scalar(const std::optional<at::Tensor>& t, const at::Tensor& ref,
                              const char* op, const char* arg, const char* ref_name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == ref.device(), op, ": ", arg, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t->device());
  TORCH_CHECK(t->numel() == 1 && t->dim() == 1, op, ": ", arg, " must have shape [1], got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == ref.scalar_type(), op, ": ", arg, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t->scalar_type());
  return t->contiguous();
}

// The BatchNorm (eval) arguments' pairing rules.
inline void check_head_bn(const at::Tensor& bn_w, const at::Tensor& bn_b, const at::Tensor& bn_rm,
                          const at::Tensor& bn_rv, const char* op) {
  TORCH_CHECK(bn_rm.defined() == bn_rv.defined(), op,
              ": bn_rm and bn_rv must be given together (BatchNorm in eval mode)");
  TORCH_CHECK(bn_rv.defined() || (!bn_w.defined() && !bn_b.defined()), op,
              ": bn_w and bn_b need bn_rm and bn_rv (BatchNorm in eval mode)");
}

// The spatial extents (D, H, W), 1 for absent leading dimensions, of a [N, *, *spatial] tensor,
// and its S (checked < 2^31: the kernels' in-sample offsets are 32-bit).
inline int64_t head_extents(const at::Tensor& t, int (&ext)[3], const char* op,
                            const char* arg) {
  const int64_t nd = t.dim() - 2;
  int64_t S = 1;
  for (int64_t d = 0; d < nd; ++d) S *= t.size(2 + d);
  TORCH_CHECK(S <= std::numeric_limits<int32_t>::max(), op, ": ", arg,
              " must have fewer than 2^31 spatial positions, got ", S);
  ext[0] = ext[1] = ext[2] = 1;
  for (int64_t d = 0; d < nd; ++d) ext[3 - nd + d] = static_cast<int>(t.size(2 + d));
  return S;
}

// The shared geometry of a head launch: N, S, the extents `ext` (head_extents), the kernel's k
// along each of the nd spatial dimensions, cin and the map order.
inline void set_head_geom(HeadGeom& g, int64_t N, int64_t S, const int (&ext)[3], int64_t nd,
                          int64_t k, int cin, int order) {
  g.N = N;
  g.S = S;
  g.D = ext[0];
  g.H = ext[1];
  g.W = ext[2];
  g.kd = nd > 2 ? static_cast<int>(k) : 1;
  g.kh = nd > 1 ? static_cast<int>(k) : 1;
  g.kw = static_cast<int>(k);
  g.cin = cin;
  g.order = order;
  g.reach = static_cast<int64_t>(g.kd / 2) * g.H * g.W + static_cast<int64_t>(g.kh / 2) * g.W +
            g.kw / 2;
}

// Threads a block, = positions a chunk, of a head kernel: the largest of kBlockThreads, 128 and
// 64 whose chunks still give every SM one, among the sizes whose staged halo (2 reach positions)
// at most doubles a chunk's reads and that allowed(threads) accepts. A small map at batch 64 (the
// 2048x7x7 site: 3136 positions, reach 24) is 13 chunks of 256 on 132 SMs, 49 of 64.
// debug tile mode 3 (tests): always kBlockThreads.
template <typename Allowed>
inline int head_block_threads(int64_t positions, int64_t reach, Allowed allowed) {
  int threads = kBlockThreads;
  while (debug::tile_mode != 3 && threads > 64 && ceil_div(positions, threads) < num_sms() &&
         2 * reach <= threads / 2 && allowed(threads / 2)) {
    threads /= 2;
  }
  return threads;
}

}  // namespace cbam
