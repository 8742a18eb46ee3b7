// Host launchers of the CBAM kernels: shape checks, dtype dispatch, grid sizing, output allocation.
// Written once, compiled by nvcc into cbam_fused._C and by g++ (-DCBAM_SIMULATOR) into
// cbam_fused._sim. Each function has the signature of its op in csrc/ops.cpp.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "dialect/launch_options.h"

namespace cbam {

// Test knobs, off by default; set from Python through the debug op of each build
// (torch.ops.cbam_fused_sim.set_debug / torch.ops.cbam_fused_debug.set_debug).
namespace debug {
// Fill every output with NaN (int64 outputs: INT64_MIN) right after allocating it, so an element
// a kernel never writes shows up in a test.
inline bool poison_outputs = false;
// Tiling: 0 = the normal heuristics; 1 = tiny tiles (at most 2 lanes along the contiguous axis,
// 3 rows per tile: every reduction splits into many partials, on small shapes); 2 = one row tile
// spanning all rows (the single-stage path of the strided reductions, chunked staging). The
// spatial heads read it their own way: 1 = one block, 2 = no staging, 3 = (the backward) blocks
// of kBlockThreads whatever the grid.
inline int tile_mode = 0;
// Grid sizing of the normal tiling (make_geom, launchers/common.h), tunable at run time so that a
// GPU session can sweep them without rebuilding (benchmarks/bench_kernels.py --sweep): aim at
// tiles_per_sm tiles (blocks) per multiprocessor, and give every thread at least
// min_rows_per_thread rows of its tile. tiles_per_sm 0 (the default): by op
// (launchers/op_tuning.h: the ops the H200 sweep of 2026-11-28 timed faster otherwise, their
// own; every other launch kBaseTilesPerSm); 1 to 64: that many for every launch (a sweep's
// settings). kBaseTilesPerSm, 32 tiles an SM, four times the 8 blocks of 256 threads it
// holds: a pass over x then runs in a few waves, its blocks at any time over a band of x rather
// than all of it, and the pass after it, in the reverse tile order (pass_order), starts on the
// bytes that band left in L2. With 8 (the default until 2026-11-27) a pass was one wave over all
// of x at once and the reversed order met little of it. By the simulator's L2 model
// (benchmarks/model_l2.py: 60 MiB, 132 SMs, batch 64), a block's inference forward fetches x from
// DRAM 2.73 times at 32 and 2.95 at 8 at the float32 NCHW 256x56x56 site, 2.54 and 2.71 at the
// bfloat16 channels-last one, 2.58 and 2.75 at the float32 512x28x28 one (3.0, 2.8, 2.8 with every
// pass in the forward order). Timed per op (the H200 sweep of 2026-11-26, 9b21929, that day's
// other knobs, buffers rotated past the L2), 8, 16 and 32 came within 0.8% of each other
// (geometric mean over the 56 cases: 46.7%, 46.9%, 46.5% of copy bandwidth; 32 0.5% under 8);
// the sweep of 2026-11-28 found single ops 6-39% faster at 4 to 16 (op_tuning.h).
constexpr int kBaseTilesPerSm = 32;
constexpr int kDefaultTilesPerSm = 0;
constexpr int kDefaultMinRowsPerThread = 4;
inline int tiles_per_sm = kDefaultTilesPerSm;
inline int min_rows_per_thread = kDefaultMinRowsPerThread;
// Rows of 16-byte vectors a thread loads before using them (the kernels' U on the vector path;
// the scalar path always takes kScalarRowsPerStep): 1, 2, 4 (reduce_r; 2 in the other kernels)
// for every launch; -1 (the default), the op's own where launchers/op_tuning.h names one, else
// as 0; 0, by element size, 2 for 4-byte elements and 1 otherwise (with_rows_in_flight,
// launchers/common.h), and in reduce_r by the grid too: 4 (else 2) where the whole grid is
// resident at once with that instance's blocks an SM (with_reduce_r_rows, launchers/reduction.h;
// argued, not yet timed: the 1024x14x14 and 512x28x28 bfloat16 channels-last pools over S at
// batch 64 run 256 and 384 blocks, 28% and 38% of copy bandwidth on the H200 at U = 1). The H200
// sweep of benchmarks/results/2026-11-26-h200 (sweep.json): U = 2 raised the float32 NCHW ops'
// geometric mean from 52.6% to 54.1% of the copy bandwidth, and lowered the bfloat16
// channels-last ones' from 41.6% to 38.4%. But as compiled then, the 16-bit instances had one
// row in flight at any U (each load converted inside its guard: README, "Loads in flight, as
// compiled"); that sweep timed their extra instructions, not more loads. To be timed again.
constexpr int kDefaultVecRowsInFlight = -1;
inline int vec_rows_in_flight = kDefaultVecRowsInFlight;
// reduce_k's 16-byte loads in flight per thread: 1 (load, fold, load...) or kReduceKVectors
// (all of the lane's vectors of the row, loaded before they are folded; under reduce_k_mode 3
// on small grids, those of kReduceKRows rows).
constexpr int kDefaultKVectorsInFlight = 4;
inline int k_vectors_in_flight = kDefaultKVectorsInFlight;
// The reductions over the contiguous axis: 0, reduce_k with one lane per vector of a row, up to
// 32; 1, reduce_k with the fewest lanes that cover a row in one tile (make_geom); 2, as 1, but
// rows of at most kShortRowBytes (of acc_t) take reduce_k_rows, one thread per row, and rows
// that are not whole 16-byte vectors, of at most kMedRowMaxK elements, too, with a few lanes a
// row (kernels/reduce_k_rows.cuh; with the normal tiling only); 3, as 2, and where reduce_k's grid
// is resident at once with that instance's 3 blocks an SM (2 for the lp / lse pools; few, long
// rows), its instance with kReduceKRows rows of loads in flight per thread (same tiles, same
// bits; with k_vectors_in_flight 4; launchers/reduction.h run_reduction). Mode 3 is argued, not yet
// timed: at the 7x7 channels-last sites of 2048 channels, batch 64, the pool over C and the
// spatial-first scale gradient run 256 and 128 blocks, two and one an SM; it doubles their
// loads in flight.
constexpr int kDefaultReduceKMode = 3;
inline int reduce_k_mode = kDefaultReduceKMode;
// The reductions over the strided axis (reduce_r, and backward_reduce's column sums): 0, lanes
// along the row a power of two up to 32; 1, a row of at most kMaxSpanCols vectors, not a power
// of two of them, one lane per vector (TX = K / VEC, TY = 256 / TX), so that a block reads whole
// rows, one contiguous span (make_geom, launchers/common.h; backward_reduce then runs its
// folded-rows kernel with G = 1, whose row sums go through shared memory, not xor shuffles).
// It reads each row whole and leaves no lane idle (a 14x14 channels-first map: 49 vectors of
// float32 a row, two column tiles of 32 lanes, the second 17 busy), but its blocks no longer
// split the columns, so the grid and the loads in flight shrink. The default since the H200
// sweep of 2026-11-28 timed it (sweep.json, at 32 tiles an SM): at the float32 NCHW 1024x14x14
// site the pool over C 1.32 times as fast, the spatial-first scale gradient 1.26, backward_reduce
// 1.43 (a build whose backward_reduce ran 17% slow that day: 1.19 against its lease-part time);
// every other case of the 56 within 1% (the other sites' rows are longer than kMaxSpanCols
// vectors, or fold). (Rows that fold into whole vectors, a 7x7 map, take span lanes whatever
// the knob: one tile must span a folded row.)
constexpr int kDefaultReduceRMode = 1;
inline int reduce_r_mode = kDefaultReduceRMode;
// The side traffic a tile may cost (make_geom): the small tensors it stages at most 1 /
// side_share of its x bytes, the partials of a second stage 1 / (2 side_share). These floors on
// the rows of a tile keep the byte counts of the pass budget (tests/test_kernels_sim.py) but, at
// the small sites, also the grids: the 7x7 channels-last sites of 2048 channels at batch 64
// run their reductions along C as 128 to 256 blocks on 132 SMs, whatever tiles_per_sm says. The
// staged values are L2 hits mostly; a sweep times a smaller share (4: tiles of 8 rows there).
// 0 (the default): by op (launchers/op_tuning.h; 8 and 4 for two 16-bit channels-last
// reductions, timed faster at the 7x7 sites), else kBaseSideShare; 1 to 64: that share for every
// launch.
constexpr int kBaseSideShare = 16;
constexpr int kDefaultSideShare = 0;
inline int side_share = kDefaultSideShare;
// reduce_k's vectors a lane takes of a row in one column tile, at most: 1, 2 or 4
// (kReduceKVectors): fewer make more, narrower column tiles, so more blocks where rows are few
// and long (the same 7x7 channels-last sites: 2 column tiles of 2048 bfloat16 channels, 8 with
// 1), at the price of more partials for the second stage. 8, 16 or 32: up to 2, 4 or 8 groups of
// kReduceKVectors (at most what the kernel stages of the weights, reduce_k_groups), where the grid
// keeps 3/4 of its tiles (make_geom): a float32 channels-first 56x56 map at batch 64, rows of
// 3136, two column tiles of 4 and 3 groups instead of 7 tiles of one (4096 tiles, not 3584),
// each lane folding 64 elements of a row per shuffle tree, store and partial instead of 16
// (about 12 instructions an element instead of 24, counted along the SASS for sm_90); a 28x28
// map's rows of 784, one tile of 2 groups, no second stage. Argued from the SASS, not yet
// timed.
constexpr int kDefaultKTileVectors = 32;
inline int k_tile_vectors = kDefaultKTileVectors;
// The order of the tiles of the x-sized passes (launchers/common.h next_pass_reversed): 0, every
// pass from the first tile; 1, a pass over a tensor the pass before it on the stream touched in
// the reverse order of that one, so that it starts on the bytes that pass touched last (L2 hits
// where x is not much larger than the L2: a block's pools over S and over C, then the apply;
// Q1, then Q2), and a pass over other tensors from its last tile. Modelled (the simulator's L2
// model: with tiles_per_sm above), not yet timed: a GPU run compares the two (bench_cbam.py
// --pass-order both).
constexpr int kDefaultPassOrder = 1;
inline int pass_order = kDefaultPassOrder;
}  // namespace debug

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_over_s(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_over_s_lp_lse(
    const at::Tensor& x, const std::optional<at::Tensor>& scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_over_c(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& scale);
at::Tensor apply_gates(const at::Tensor& x, const std::optional<at::Tensor>& gc,
                       const std::optional<at::Tensor>& gs);
// The channel gate's head (kernels/channel_head.cuh): (gc [N, C], P [k N, C] the stacked MLP
// inputs, h [k N, H] the hidden layer, after relu / before another activation).
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_head(
    const at::Tensor& avg, const at::Tensor& max, const std::optional<at::Tensor>& lp,
    const std::optional<at::Tensor>& lse, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
    const std::optional<at::Tensor>& b2, c10::string_view pools, c10::string_view act);
// Its backward (kernels/channel_head_backward.cuh): (dP [k N, C] (blend: [N, C], the gradient of
// avg and of max alike), dW1, db1, dW2, db2; each bias's and dW2 empty where absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_head_backward(
    const at::Tensor& dzc, const at::Tensor& p, const at::Tensor& h, const at::Tensor& w1,
    const std::optional<at::Tensor>& w2, bool has_b1, bool has_b2, c10::string_view pools,
    c10::string_view act);
// The spatial gate's head (kernels/spatial_head.cuh): (gs [N, S] or empty without `gate`,
// smap [N, cin, *spatial], zconv [N, 1, *spatial]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_head(
    const at::Tensor& avg, const at::Tensor& max, const at::Tensor& conv_w,
    const std::optional<at::Tensor>& conv_b, const std::optional<at::Tensor>& bn_w,
    const std::optional<at::Tensor>& bn_b, const std::optional<at::Tensor>& bn_rm,
    const std::optional<at::Tensor>& bn_rv, double bn_eps, c10::string_view spatial_pools,
    bool gate);
// Its backward (kernels/spatial_head_backward.cuh): (du, dv [N, S], d conv_w, then d conv_b,
// d bn_w, d bn_b as [1], each empty where its parameter is not given). Without gs, grad is the
// conv output's gradient (batch_norm_gate_backward gives it with BatchNorm in training mode).
// BatchNorm (eval) needs gs and zconv.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
spatial_head_backward(const at::Tensor& grad, const std::optional<at::Tensor>& gs,
                      const at::Tensor& smap, const std::optional<at::Tensor>& zconv,
                      const at::Tensor& conv_w, const std::optional<at::Tensor>& conv_b,
                      const std::optional<at::Tensor>& bn_w, const std::optional<at::Tensor>& bn_b,
                      const std::optional<at::Tensor>& bn_rm,
                      const std::optional<at::Tensor>& bn_rv, double bn_eps,
                      c10::string_view spatial_pools);
// The spatial gate's BatchNorm with batch statistics and sigmoid (kernels/batch_norm_gate.cuh):
// (gs [N, S], mean, invstd, unbiased var [1] each).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_gate(
    const at::Tensor& zconv, const std::optional<at::Tensor>& bn_w,
    const std::optional<at::Tensor>& bn_b, double bn_eps);
// Its backward: (d zconv [N, S], d bn_w [1] (empty without bn_w), d bn_b [1] (empty without
// has_b)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_gate_backward(
    const at::Tensor& dgs, const at::Tensor& gs, const at::Tensor& zconv, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& bn_w, bool has_b);
std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad, const at::Tensor& x,
                                                   const std::optional<at::Tensor>& gc,
                                                   const std::optional<at::Tensor>& gs,
                                                   bool need_rc, bool need_rs);
at::Tensor pool_over_c_backward_scale(const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
                                      const std::optional<at::Tensor>& d_max,
                                      const std::optional<at::Tensor>& argmax,
                                      const std::optional<at::Tensor>& base,
                                      const std::optional<at::Tensor>& gate);
at::Tensor pool_over_s_backward_scale(const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
                                      const std::optional<at::Tensor>& d_max,
                                      const std::optional<at::Tensor>& argmax,
                                      const std::optional<at::Tensor>& base,
                                      const std::optional<at::Tensor>& gate);
at::Tensor pool_over_s_backward_scale_lp_lse(
    const at::Tensor& x, const std::optional<at::Tensor>& d_avg,
    const std::optional<at::Tensor>& d_max, const std::optional<at::Tensor>& argmax,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& d_lp,
    const std::optional<at::Tensor>& lp, const std::optional<at::Tensor>& d_lse,
    const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& base,
    const std::optional<at::Tensor>& gate);
at::Tensor grad_input(const at::Tensor& grad, const std::optional<at::Tensor>& gc,
                      const std::optional<at::Tensor>& gs, const std::optional<at::Tensor>& da,
                      const std::optional<at::Tensor>& dm, const std::optional<at::Tensor>& idx_s,
                      const std::optional<at::Tensor>& du, const std::optional<at::Tensor>& dv,
                      const std::optional<at::Tensor>& idx_c, int64_t arrangement);
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
                             const std::optional<at::Tensor>& lse, int64_t arrangement);

// Sets the tuning knobs above (the body of the set_tuning debug ops); returns the previous values
// [tiles_per_sm, min_rows_per_thread, vec_rows_in_flight, reduce_k_mode, k_vectors_in_flight,
// reduce_r_mode, side_share, k_tile_vectors]. tiles_per_sm 0 (by op) or in [1, 64],
// min_rows_per_thread in [1, 64], vec_rows_in_flight -1 (by op), 0 (by element size), 1, 2 or 4,
// reduce_k_mode 0 to 3, k_vectors_in_flight 1 or 4, reduce_r_mode 0 or 1, side_share 0 (by op)
// or in [1, 64], k_tile_vectors 1, 2, 4, 8, 16 or 32.
inline std::vector<int64_t> set_tuning(int64_t tiles_per_sm, int64_t min_rows_per_thread,
                                       int64_t vec_rows_in_flight, int64_t reduce_k_mode,
                                       int64_t k_vectors_in_flight, int64_t reduce_r_mode,
                                       int64_t side_share, int64_t k_tile_vectors) {
  TORCH_CHECK(tiles_per_sm >= 0 && tiles_per_sm <= 64,
              "set_tuning: tiles_per_sm must be 0 (by op) or in [1, 64], got ", tiles_per_sm);
  TORCH_CHECK(min_rows_per_thread >= 1 && min_rows_per_thread <= 64,
              "set_tuning: min_rows_per_thread must be in [1, 64], got ", min_rows_per_thread);
  TORCH_CHECK(vec_rows_in_flight >= -1 && vec_rows_in_flight <= 4 && vec_rows_in_flight != 3,
              "set_tuning: vec_rows_in_flight must be -1 (by op), 0 (by element size), 1, 2 or "
              "4, got ",
              vec_rows_in_flight);
  TORCH_CHECK(reduce_k_mode >= 0 && reduce_k_mode <= 3,
              "set_tuning: reduce_k_mode must be 0, 1, 2 or 3, got ", reduce_k_mode);
  TORCH_CHECK(k_vectors_in_flight == 1 || k_vectors_in_flight == 4,
              "set_tuning: k_vectors_in_flight must be 1 or 4, got ", k_vectors_in_flight);
  TORCH_CHECK(reduce_r_mode == 0 || reduce_r_mode == 1,
              "set_tuning: reduce_r_mode must be 0 or 1, got ", reduce_r_mode);
  TORCH_CHECK(side_share >= 0 && side_share <= 64,
              "set_tuning: side_share must be 0 (by op) or in [1, 64], got ", side_share);
  TORCH_CHECK(k_tile_vectors >= 1 && k_tile_vectors <= 32 &&
                  (k_tile_vectors & (k_tile_vectors - 1)) == 0,
              "set_tuning: k_tile_vectors must be 1, 2, 4, 8, 16 or 32, got ", k_tile_vectors);
  std::vector<int64_t> old{debug::tiles_per_sm,       debug::min_rows_per_thread,
                           debug::vec_rows_in_flight, debug::reduce_k_mode,
                           debug::k_vectors_in_flight, debug::reduce_r_mode,
                           debug::side_share,         debug::k_tile_vectors};
  debug::tiles_per_sm = static_cast<int>(tiles_per_sm);
  debug::min_rows_per_thread = static_cast<int>(min_rows_per_thread);
  debug::vec_rows_in_flight = static_cast<int>(vec_rows_in_flight);
  debug::reduce_k_mode = static_cast<int>(reduce_k_mode);
  debug::k_vectors_in_flight = static_cast<int>(k_vectors_in_flight);
  debug::reduce_r_mode = static_cast<int>(reduce_r_mode);
  debug::side_share = static_cast<int>(side_share);
  debug::k_tile_vectors = static_cast<int>(k_tile_vectors);
  return old;
}

// (device type, device index, stream id): what the launchers keep per stream (launchers/common.h
// stream_key).
using StreamKey = std::tuple<int, int, int64_t>;

// The group counters of the reductions split over tiles (kernels/combine_partials.cuh), one
// buffer per device and stream, kept (launchers/common.h group_counters). Leaked on purpose: no
// destructor frees device memory after the CUDA context is gone at exit.
struct GroupCounterStore {
  std::mutex mu;
  std::map<StreamKey, at::Tensor> bufs;
};
inline GroupCounterStore& group_counter_store() {
  static auto* store = new GroupCounterStore();
  return *store;
}
// The last x-sized pass on each device and stream: its tensors and tile order
// (launchers/common.h next_pass_reversed).
struct PassOrderStore {
  static constexpr int kMaxTouched = 3;  // x-sized tensors of a pass: grad_input_lp_lse's
  struct Last {
    const void* touched[kMaxTouched] = {};  // the data of the x-sized tensors it read or wrote
    bool reversed = false;
  };
  std::mutex mu;
  std::map<StreamKey, Last> last;
};
inline PassOrderStore& pass_order_store() {
  static auto* store = new PassOrderStore();
  return *store;
}

// The kept buffers (the group_counters debug op): every counter is zero between launches.
inline std::vector<at::Tensor> group_counter_buffers() {
  GroupCounterStore& s = group_counter_store();
  const std::lock_guard<std::mutex> lock(s.mu);
  std::vector<at::Tensor> out;
  for (const auto& kv : s.bufs) out.push_back(kv.second);
  return out;
}

// The schemas of the knob-setting debug ops (torch.ops.cbam_fused_sim / cbam_fused_debug).
inline constexpr const char* kSetDebugSchema =
    "set_debug(bool poison_outputs, int tile_mode) -> ()";
inline constexpr const char* kGroupCountersSchema = "group_counters() -> Tensor[]";
inline constexpr const char* kSetPassOrderSchema = "set_pass_order(int mode) -> int";
inline constexpr const char* kSetPdlSchema = "set_pdl(int mode) -> int";
inline constexpr const char* kSetTuningSchema =
    "set_tuning(int tiles_per_sm, int min_rows_per_thread, int vec_rows_in_flight=-1, "
    "int reduce_k_mode=3, int k_vectors_in_flight=4, int reduce_r_mode=1, int side_share=0, "
    "int k_tile_vectors=32) -> int[]";

// Sets debug::pass_order (the set_pass_order debug op): 0, every x-sized pass from its first
// tile; 1, by the pass before it (next_pass_reversed). Either way the passes before are
// forgotten: the next pass on every stream counts as over new tensors. Returns the previous mode.
inline int64_t set_pass_order(int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, "set_pass_order: mode must be 0 (every pass forward) or 1 "
              "(by the pass before), got ", mode);
  PassOrderStore& s = pass_order_store();
  const std::lock_guard<std::mutex> lock(s.mu);
  const int64_t old = debug::pass_order;
  debug::pass_order = static_cast<int>(mode);
  s.last.clear();
  return old;
}

// Sets cbam::pdl_mode (the set_pdl debug op; dialect.cuh launch): 0, every kernel launches when
// the stream's previous kernel has ended (the default); 1, programmatic dependent launch on sm_90+
// devices: a kernel may launch, and its blocks take the SMs the previous kernel's last wave
// leaves free, once every block of that kernel has started; each block then waits at its first
// statement (grid_dependency_sync) until that kernel has completed. The same results either way;
// what it saves is the gap between dependent launches, a few microseconds each, which the small
// sites' passes (a 7x7 map: 3-6 us of bytes) feel most. Off until a GPU run times it
// (bench_cbam.py --pdl-also). Returns the previous mode.
inline int64_t set_pdl(int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, "set_pdl: mode must be 0 (launches in stream order) or 1 "
              "(programmatic dependent launch where the device has it), got ", mode);
  const int64_t old = pdl_mode;
  pdl_mode = static_cast<int>(mode);
  return old;
}

// Sets the debug knobs above (the body of the debug ops).
inline void set_debug(bool poison_outputs, int64_t tile_mode) {
  debug::poison_outputs = poison_outputs;
  debug::tile_mode = static_cast<int>(tile_mode);
}

}  // namespace cbam
