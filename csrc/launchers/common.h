// Host helpers shared by the launchers: layout detection, argument checks, output allocation,
// tile geometry. Included by every launcher .cu (both builds; header-only, `inline`).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include <c10/core/DeviceGuard.h>

#include "kernels/combine_partials.cuh"  // (combine_groups_kernel: launch_combine_groups)
#include "kernels/common.cuh"
#include "launchers/launchers.h"
#include "launchers/op_tuning.h"

namespace cbam {

// x as [N, C, S] in one of the two supported layouts.
struct XView {
  at::Tensor x;  // dense in the layout below (x itself, or one copy of it)
  int64_t N, C, S;
  bool cl;  // channels-last ([N, S, C] contiguous); else channels-first ([N, C, S] contiguous)
  int64_t R() const { return cl ? S : C; }
  int64_t K() const { return cl ? C : S; }
};

// Strides of [N, *spatial, C] contiguous (dims of size 1 may have any stride).
inline bool is_channels_last_dense(const at::Tensor& x) {
  const auto sizes = x.sizes();
  const auto strides = x.strides();
  int64_t expected = 1;
  auto ok = [&](int64_t d) {
    if (sizes[d] != 1 && strides[d] != expected) return false;
    expected *= sizes[d];
    return true;
  };
  if (!ok(1)) return false;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (!ok(d)) return false;
  }
  return ok(0);
}

inline at::Tensor to_channels_last(const at::Tensor& x) {
  std::vector<int64_t> perm{0}, inv(x.dim());
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  for (int64_t i = 0; i < x.dim(); ++i) inv[perm[i]] = i;
  return x.permute(perm).contiguous().permute(inv);
}

// The layout of x, or one copy to the nearest supported layout.
inline at::Tensor to_supported_layout(const at::Tensor& x, bool* cl) {
  if (x.is_contiguous()) {
    *cl = false;
    return x;
  }
  if (is_channels_last_dense(x)) {
    *cl = true;
    return x;
  }
  const auto fmt = x.suggest_memory_format();
  *cl = fmt == at::MemoryFormat::ChannelsLast || fmt == at::MemoryFormat::ChannelsLast3d ||
        (x.dim() != 4 && x.dim() != 5 && x.size(1) > 1 && x.stride(1) == 1);
  return *cl ? to_channels_last(x) : x.contiguous();
}

inline void check_x_dtype(const at::Tensor& x, const char* op, const char* arg) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": ", arg, " must be float16, bfloat16, float32 or float64, got ", t);
}

inline XView view_x(const at::Tensor& x, const char* op, const char* arg) {
  TORCH_CHECK(x.dim() >= 3, op, ": ", arg,
              " must have shape [N, C, *spatial] with at least one spatial dimension, got shape ",
              x.sizes());
  check_x_dtype(x, op, arg);
  XView v;
  v.x = to_supported_layout(x, &v.cl);
  v.N = x.size(0);
  v.C = x.size(1);
  v.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) v.S *= x.size(d);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(v.C <= kMax && v.S <= kMax, op, ": ", arg,
              " must have fewer than 2^31 channels and spatial positions, got C = ", v.C,
              ", S = ", v.S);
  return v;
}

// `t` (x-sized) brought to the layout of `v`, after checking it against x (the argument named
// `ref`, that v views).
inline at::Tensor like_x(const at::Tensor& t, const XView& v, const at::Tensor& x, const char* op,
                         const char* arg, const char* ref = "x") {
  TORCH_CHECK(t.device() == x.device(), op, ": ", arg, " must be on the device of ", ref, " (",
              x.device(), "), got ", t.device());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", arg, " must have the shape of ", ref, " ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", arg, " must have the dtype of ", ref,
              " (", x.scalar_type(), "), got ", t.scalar_type());
  if (v.cl) return is_channels_last_dense(t) ? t : to_channels_last(t);
  return t.contiguous();
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A small [N, L] argument: checked, contiguous; undefined when absent.
inline at::Tensor small_arg(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t N,
                            int64_t L, at::ScalarType dtype, const char* op, const char* arg,
                            const char* shape) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == x.device(), op, ": ", arg, " must be on the device of x (",
              x.device(), "), got ", t->device());
  TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == L, op, ": ", arg,
              " must have shape ", shape, " = [", N, ", ", L, "], got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, op, ": ", arg, " must have dtype ", dtype,
              (dtype == at::kLong ? "" : " (the accumulation dtype of x)"), ", got ",
              t->scalar_type());
  return t->contiguous();
}

template <typename P>
inline const P* opt_ptr(const at::Tensor& t) {
  return t.defined() ? global_ptr<P>(t) : nullptr;
}

inline at::Tensor poisoned(at::Tensor t) {
  if (debug::poison_outputs && t.numel() > 0) {
    if (t.is_floating_point()) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else if (t.scalar_type() == at::kInt) {  // (a partial argmax)
      t.fill_(std::numeric_limits<int32_t>::min());
    } else {
      t.fill_(std::numeric_limits<int64_t>::min());
    }
  }
  return t;
}

// A new output (PyTorch's allocator), poisoned when debug::poison_outputs is set.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return poisoned(at::empty(sizes, opts));
}

// A new x-sized output shaped and strided like v.x (dense in its layout), poisoned likewise.
inline at::Tensor new_like(const XView& v) {
  return poisoned(at::empty_strided(v.x.sizes(), v.x.strides(), v.x.options()));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block shape and tiles for x viewed as [N, R, K] with VEC elements per thread (common.cuh).
struct LaunchGeom {
  Geom g;
  int tx, ty;
  Tuning tune;  // the knobs it was sized with (with_rows_in_flight reads them too)
  dim3 grid() const { return dim3(static_cast<unsigned>(g.N * g.nrt * g.nkt)); }
  dim3 block() const { return dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty)); }
};

// kv_max: vectors per lane and row of a column tile (reduce_k: kReduceKVectors, or fewer under
// debug::k_tile_vectors; else 1).
// Side traffic per column of a tile, which sets the fewest rows a tile may have:
// staged_bytes, the small [N, C] / [N, S] tensors a tile reads (gates, weights: L2 hits mostly,
// but counted by the pass budget) at most 1 / t.side_share (16 unless the op's own) of the
// tile's x bytes;
// partial_bytes, the partials a second stage reads back (a reduction over rows: written, read
// again by the last block of their group) at most half that. (Both at 1/32 held the small
// channels-last sites to a few hundred blocks whatever tiles_per_sm and min_rows_per_thread
// said: a 2048x7x7 bfloat16 pool over C ran as 128 blocks on 132 SMs.)
// Lanes per row (TX, a power of two <= 32): one per vector of the row; with kv_max > 1 and
// debug::reduce_k_mode >= 1, the fewest that cover the row with kv_max vectors each (a row of
// 49 floats: 16 lanes of up to 4 instead of 32 lanes of 1 or 2), so a warp holds more rows and
// the xor-shuffle tree that combines a row's lanes takes fewer steps per row; the same bytes
// are loaded either way.
// Span lanes: a row of at most kMaxSpanCols vectors, not a power of two of them, gets one lane
// per vector (TX = K / VEC, TY = 256 / TX: fewer than 256 threads where TX does not divide 256),
// so a block reads TY whole rows, one contiguous span, at each step. (Lanes by powers of two: a
// 7x7 channels-first map, 49 floats a row on the scalar path, took two column tiles of 32 lanes,
// the second 17 lanes busy, and each row read in two pieces by two blocks; a 14x14 map, 49
// vectors, the same.) `spans` says when (SpanLanes).
enum class SpanLanes {
  kNever,
  kByKnob,    // under debug::reduce_r_mode 1 (reduce_r, whose column tree takes any TY)
  kAlways,    // a power of two too (one tile spans the row: reduce_r's folded rows)
  kIfFuller,  // where they leave fewer of a block's 256 threads idle than lanes by powers of two
              // (the x-sized kernels, whose lanes never combine: 49 vectors, 245 threads busy
              // instead of 2 tiles of 32 lanes, 49 of 64)
};

// k_period (rows folded into one, Fold): the small values along k repeat every k_period columns
// and a tile stages each once (stage_k_side_folded), and writes one partial per original column,
// so a tile of more columns moves fewer of those bytes per column.
// groups_max (reduce_k: up to reduce_k_groups, the groups of kv_max vectors a lane may take of a
// row in one tile; else 1): a row of more than one group per lane is split into the fewest
// column tiles (nkt) whose grid keeps at least 3/4 of the tiles of one group a lane (or of the
// target, num_sms * t.tiles_per_sm, where those are more; 3/4: the row tiles round the target
// down), each of g = ceil(groups / nkt) groups (balanced), so that a lane folds more of a row
// per shuffle tree, row store and partial while a pass keeps its waves (and the bands of x the
// next pass, in the reverse order, meets in L2: pass_order). Its rows per tile floor is then
// ty * ceil(min_rows_per_thread / g) (a thread's groups of a row count as its rows). Where no
// such nkt keeps them, one group a lane (as groups_max 1).
// t: the launch's knobs (tuning_for, launchers/op_tuning.h).
inline LaunchGeom make_geom(int64_t N, int64_t R, int64_t K, int vec, int kv_max,
                            int64_t staged_bytes, int64_t partial_bytes, int64_t elem_bytes,
                            const char* op, const Tuning& t, SpanLanes spans = SpanLanes::kNever,
                            int64_t k_period = 0, int groups_max = 1) {
  LaunchGeom lg;
  lg.tune = t;
  if (kv_max > 1) kv_max = std::min(kv_max, debug::k_tile_vectors);
  const int64_t need = ceil_div(K, vec);
  const int64_t lanes = kv_max > 1 && debug::reduce_k_mode >= 1 ? ceil_div(need, kv_max) : need;
  int tx = 1;
  while (tx < 32 && tx < lanes) tx *= 2;
  if (debug::tile_mode == 1 && tx > 2) tx = 2;
  if (spans != SpanLanes::kNever && debug::tile_mode != 1 && kv_max == 1 &&
      need <= kMaxSpanCols) {
    const bool pow2 = (need & (need - 1)) == 0;
    // busy threads of a block: one a vector of TY = 256 / need whole rows, or need of the
    // ceil(need / tx) column tiles' tx each
    const double span_fill = static_cast<double>(need * (kBlockThreads / need)) / kBlockThreads;
    const double pow2_fill =
        static_cast<double>(need) / static_cast<double>(ceil_div(need, tx) * tx);
    if (spans == SpanLanes::kAlways ||
        (!pow2 && (spans == SpanLanes::kByKnob ? debug::reduce_r_mode == 1
                                               : span_fill > pow2_fill))) {
      tx = static_cast<int>(need);
    }
  }
  lg.tx = tx;
  lg.ty = kBlockThreads / tx;
  Geom& g = lg.g;
  g.counters = nullptr;  // (split reductions: group_counters)
  g.reverse = 0;         // (the x-sized passes: next_pass_reversed)
  g.N = N;
  g.R = R;
  g.K = K;
  const int64_t kv = std::max<int64_t>(1, std::min<int64_t>(kv_max, ceil_div(need, tx)));
  // the tiles that fill the device a few times over (t.tiles_per_sm per SM)
  const int64_t target = static_cast<int64_t>(num_sms()) * t.tiles_per_sm;
  // the rows of the tiles for column tiles of `cols` columns, `groups` groups a lane: sets
  // g.cols_per_tile, nkt, nrt and rows_per_tile
  const auto tile_rows = [&](int64_t cols, int64_t groups) {
    g.cols_per_tile = cols;
    g.nkt = ceil_div(K, cols);
    int64_t staged = staged_bytes, partial = partial_bytes;
    if (k_period > 0 && k_period < cols) {  // per original column, not folded one
      staged = ceil_div(staged * k_period, cols);
      partial = ceil_div(partial * k_period, cols);
    }
    int64_t rpt;
    if (debug::tile_mode == 1) {
      rpt = 3;
    } else if (debug::tile_mode == 2) {
      rpt = R;
    } else {
      // Enough tiles to fill the device a few times over (t.tiles_per_sm per SM, 32 unless
      // the op's own), each thread walking at least t.min_rows_per_thread rows (default 4), and
      // the side traffic bounded as above.
      const int64_t want_tiles = ceil_div(target, N * g.nkt);
      rpt = std::max({ceil_div(R, want_tiles),
                      static_cast<int64_t>(lg.ty) * ceil_div(t.min_rows_per_thread, groups),
                      ceil_div(t.side_share * staged, elem_bytes),
                      ceil_div(2 * t.side_share * partial, elem_bytes)});
    }
    rpt = std::max<int64_t>(1, std::min<int64_t>(rpt, R));
    g.nrt = ceil_div(R, rpt);
    g.rows_per_tile = ceil_div(R, g.nrt);  // balanced tiles
    g.nrt = ceil_div(R, g.rows_per_tile);
  };
  const int64_t group_cols = static_cast<int64_t>(tx) * vec * (debug::tile_mode == 1 ? 1 : kv);
  const int64_t groups = ceil_div(K, group_cols);  // of a row
  tile_rows(group_cols, 1);  // one group a lane
  if (groups_max > 1 && groups > 1 && debug::tile_mode == 0) {
    const Geom one = g;
    const int64_t keep = std::min(target, N * one.nrt * one.nkt) * 3 / 4;
    bool done = false;
    for (int64_t nkt = ceil_div(groups, groups_max); nkt < groups && !done; ++nkt) {
      const int64_t per_tile = ceil_div(groups, nkt);
      tile_rows(group_cols * per_tile, per_tile);
      done = N * g.nrt * g.nkt >= keep;
    }
    if (!done) g = one;
  }
  TORCH_CHECK(N * g.nrt * g.nkt <= std::numeric_limits<int32_t>::max(), op,
              ": the input is too large for one launch (", N * g.nrt * g.nkt, " tiles)");
  return lg;
}

// The rows folded into one for 16-byte vectors of `vec` elements on rows of v.K() elements
// (Fold, kernels/common.cuh): G = vec / gcd(K, vec) (1: the rows are whole vectors) where
// R % G == 0, K >= vec (a vector then holds elements of at most two rows: grad_input keeps the
// sides of both in registers) and a folded row has fewer than 2^31 elements; 0 where the rows
// cannot fold (the scalar path).
inline int fold_rows(const XView& v, int vec) {
  const int64_t G = vec / std::gcd<int64_t>(v.K(), vec);
  if (G > 1 && (v.K() < vec || v.R() % G != 0 ||
                v.K() * G > std::numeric_limits<int32_t>::max())) {
    return 0;
  }
  return static_cast<int>(G);
}

// The tiles of x [N, R, K] with rows folded G at a time (G == 1: the rows as they are; make_geom
// with the folded extents and, for G > 1, the period of the small values along k, under op's
// knobs for x's layout and element size), and the Fold the kernels take.
inline LaunchGeom folded_geom(const XView& v, int G, int vec, int kv_max, int64_t staged_bytes,
                              int64_t partial_bytes, int64_t elem_bytes, const char* op,
                              SpanLanes spans, int groups_max = 1) {
  return make_geom(v.N, v.R() / G, v.K() * G, vec, kv_max, staged_bytes, partial_bytes,
                   elem_bytes, op, tuning_for(op, v.cl, elem_bytes), spans, G > 1 ? v.K() : 0,
                   groups_max);
}
inline Fold fold_of(const XView& v, int G) { return Fold{G, static_cast<int>(v.K())}; }

// Calls f(std::integral_constant<int, U>{}) with the rows in flight U of a row-walking kernel:
// kScalarRowsPerStep on the scalar path, t.vec_rows_in_flight on the vector path (0: 2 for
// 4-byte elements, VEC == 4, else 1), at most kMaxU (4: reduce_r, whose tiles at the small sites
// give a thread a handful of rows; 2: the other kernels, which instantiate no U = 4).
template <int VEC, int kMaxU = 2, typename F>
void with_rows_in_flight(const Tuning& t, F&& f) {
  const int u = t.vec_rows_in_flight != 0 ? t.vec_rows_in_flight : (VEC == 4 ? 2 : 1);
  if constexpr (VEC == 1) {
    f(std::integral_constant<int, kScalarRowsPerStep>{});
  } else if (kMaxU >= 4 && u == 4) {
    f(std::integral_constant<int, (kMaxU >= 4 ? 4 : 2)>{});
  } else if (u >= 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// The key of the current stream of device d in the launchers' per-stream stores.
inline StreamKey stream_key(const c10::Device& d) {
  return {static_cast<int>(d.type()), d.index(), stream_id()};
}

// The tile order of an x-sized pass (Geom::reverse) on the current stream, from the x-sized
// tensors it reads and writes (`touched`, at most PassOrderStore::kMaxTouched; undefined ones
// skipped) and the pass before it there.
// Under debug::pass_order 1: where it touches a tensor that pass touched, the opposite of that
// pass's order, so that it starts on the bytes that pass touched last (a block's pool over C
// after its pool over S, the apply after that, Q2 after Q1); where it touches none, from the
// last tile, since the kernel that wrote its input most likely wrote it first to last (a
// convolution before the block; the loss's backward before Q1). A pass's last blocks then touch
// the start of its tensors, where the next reader most likely begins (the apply's y; Q3's dx).
// Blocks start roughly in order of blockIdx; the tiles, their fold orders and so the results
// are the same either way, and a CUDA graph keeps the order of each captured launch. A tensor
// freed and another allocated at its address counts as the same: a guess either way.
inline int next_pass_reversed(std::initializer_list<const at::Tensor*> touched) {
  if (debug::pass_order == 0) return 0;
  constexpr int kMax = PassOrderStore::kMaxTouched;
  TORCH_CHECK(touched.size() <= static_cast<size_t>(kMax),
              "next_pass_reversed: internal error: more than ", kMax, " tensors");
  const void* ptrs[kMax] = {};
  c10::Device device(c10::kCPU);
  int n = 0;
  for (const at::Tensor* t : touched) {
    if (t->defined() && t->data_ptr() != nullptr) {  // (not the empty slots' null)
      ptrs[n++] = t->data_ptr();
      device = t->device();
    }
  }
  PassOrderStore& s = pass_order_store();
  const std::lock_guard<std::mutex> lock(s.mu);
  PassOrderStore::Last& last = s.last[stream_key(device)];
  const auto end = last.touched + kMax;
  const bool related = std::any_of(ptrs, ptrs + n, [&](const void* p) {
    return std::find(last.touched, end, p) != end;
  });
  last.reversed = related ? !last.reversed : true;
  std::copy(ptrs, ptrs + kMax, last.touched);
  return last.reversed ? 1 : 0;
}

// Whether a split reduction's groups of P partials each are folded by a second launch
// (kernels/combine_partials.cuh combine_groups_kernel) rather than by each group's last block:
// from 1024 partials on (sums along rows of 131072 elements or more, or across 32768 rows or
// more: a channels-last map of 181 x 181 at batch 1; at the ResNet-50 and MobileNet sites a
// group has at most a few hundred), from 64 under the tiny test tiles (debug::tile_mode 1), so
// that the simulator's tests reach it on small tensors.
inline bool combine_in_second_launch(int64_t P) {
  return P >= (debug::tile_mode == 1 ? 64 : 1024);
}

// The second launch of a split reduction (combine_in_second_launch): out [N, L] from the
// partials [N, P, L] that pol reads, one output a warp.
template <bool OVER_K, typename Policy>
void launch_combine_groups(const char* op, const Policy& pol, const Geom& g, int64_t L) {
  const int64_t blocks = g.N * ceil_div(L, static_cast<int64_t>(kCombineWarps));
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": ", blocks,
              " blocks for the second stage");
  launch(op, &combine_groups_kernel<OVER_K, Policy>, dim3(static_cast<unsigned>(blocks)),
         dim3(kBlockThreads), 0, pol, g, L);
}

// The zeroed counters of a launch's `count` groups (a reduction split over tiles: the last block
// of each group combines the group's partials, kernels/combine_partials.cuh), as Geom::counters.
// Outside a CUDA graph capture: the buffer of x's device and the current stream, kept between
// launches (group_counter_store; grown where too short, zeroed when made); each group's last block
// sets its counter back to zero, so the next launch on the stream finds them zero, and no memset
// or second launch is queued. Launches on one stream run in order; other streams have their own
// buffers. During a capture: a new buffer zeroed by a memset node of the graph, since a graph may
// be replayed on any stream, alongside other graphs captured on the same stream. `keep` holds
// the buffer until the launch is queued.
// idle: counters under which no block of the launch finishes a group (each starts at INT_MIN / 2,
// so no ticket is P - 1), for a split whose partials a second launch folds
// (combine_in_second_launch): every block still fences and takes its ticket. A buffer of the
// launch's own, filled by ATen's kernel on the current stream (under a capture too).
inline int* group_counters(const at::Tensor& like, int64_t count, std::vector<at::Tensor>& keep,
                           bool idle = false) {
  const auto opts = like.options().dtype(at::kInt);
  if (idle) {
    keep.push_back(at::full({count}, std::numeric_limits<int>::min() / 2, opts));
  } else if (stream_capturing()) {
    keep.push_back(at::empty({count}, opts));
    zero_async(keep.back().data_ptr(), static_cast<size_t>(count) * sizeof(int));
  } else {
    GroupCounterStore& s = group_counter_store();
    const std::lock_guard<std::mutex> lock(s.mu);
    at::Tensor& buf = s.bufs[stream_key(like.device())];
    if (!buf.defined() || buf.numel() < count) {
      const int64_t old = buf.defined() ? buf.numel() : 0;
      buf = at::zeros({std::max<int64_t>({count, 2 * old, 1024})}, opts);
    }
    keep.push_back(buf);
  }
  return global_ptr<int>(keep.back());
}

}  // namespace cbam
