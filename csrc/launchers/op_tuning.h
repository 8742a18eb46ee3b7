// The grid knobs of one launch (Tuning): the debug knobs (launchers/launchers.h) where a sweep set
// them for every launch, else the op's own row of kOpTuning, else the base values.
//
// kOpTuning holds the ops, layouts and element sizes the H200 sweep of 2026-11-28
// (benchmarks/results/2026-11-28-h200/sweep.json: 56 cases, the ResNet-50 CBAM sites at batch
// 64, float32 NCHW and bfloat16 channels-last, each op alone in a CUDA graph, buffers rotated
// past the L2) timed faster at one setting at every site than at the base ones: per row, the
// fraction of copy bandwidth at the sites 256x56x56 / 512x28x28 / 1024x14x14 / 2048x7x7 over the
// base setting's. Rows only where every site was at least as fast, the gain past the sweep's
// run-to-run spread (3%) somewhere, and the op's timing at the base setting near the lease
// part's of the same day: within 3%, but for the 16-bit channels-last pool over C's scale
// gradient, 7% faster and 5% slower at 56x56 and 28x28 (its row's gains there are 10% and 16%).
// Not the float32 backward_reduce and the 56x56 bfloat16 pool over S: 9-30% slower in that
// sweep than in the lease part (that build's in-kernel fold, since reverted, slowed them).
// Other element sizes and layouts (float16 is 2 bytes: it takes the bfloat16 rows) and the
// lp / lse variants keep the base values: not timed.
//
// Why, as far as the counters-free sweep tells: the float32 channels-first reductions over the
// strided axis (reduce_r: the pool over C, the spatial-first scale gradient) and dx run fastest
// as one wave of long-lived blocks (4 tiles an SM, each thread walking many rows) with 4 rows of
// loads in flight, where 32 tiles an SM run several waves of short blocks; the 16-bit
// channels-last reductions along C at 7x7 (rows of 2048 channels, 49 a sample) get more blocks
// when a tile's side traffic may be a larger share of its bytes.
#pragma once

#include <cstdint>
#include <cstring>

#include "launchers/launchers.h"

namespace cbam {

// The knobs make_geom and the rows-in-flight choices read for one launch.
struct Tuning {
  int tiles_per_sm;        // >= 1
  int min_rows_per_thread; // >= 1
  int vec_rows_in_flight;  // 0: by element size (and reduce_r's grid); else 1, 2 or 4
  int side_share;          // >= 1
};

// One op's own knobs, 0 where it keeps the base value.
struct OpTuning {
  const char* op;
  bool cl;  // channels-last; else channels-first
  int elem_bytes;
  int tiles_per_sm, vec_rows_in_flight, side_share;
};

inline constexpr OpTuning kOpTuning[] = {
    // float32 NCHW
    {"pool_over_s", false, 4, 16, 0, 0},                 // 1.13 / 1.00 / 1.00 / 1.00
    {"pool_over_c", false, 4, 4, 4, 0},                  // 1.24 / 1.07 / 1.10 / 1.01
    {"pool_over_s_backward_scale", false, 4, 4, 4, 0},   // 1.39 / 1.39 / 1.20 / 1.15
    {"grad_input", false, 4, 4, 0, 0},                   // 1.06 / 1.06 / 1.07 / 1.23
    // bfloat16 (16-bit) channels-last
    {"pool_over_c", true, 2, 0, 0, 8},                   // 1.00 / 1.00 / 1.00 / 1.66
    {"apply_gates", true, 2, 16, 2, 0},                  // 1.07 / 1.07 / 1.03 / 1.05
    {"pool_over_c_backward_scale", true, 2, 8, 2, 0},    // 1.10 / 1.16 / 1.00 / 1.00
    {"pool_over_s_backward_scale", true, 2, 0, 0, 4},    // 1.00 / 1.14 / 1.26 / 1.10
};

// The row of kOpTuning for (op, layout, element size); nullptr where there is none.
inline const OpTuning* op_tuning_row(const char* op, bool cl, int64_t elem_bytes) {
  for (const OpTuning& r : kOpTuning) {
    if (r.cl == cl && r.elem_bytes == elem_bytes && std::strcmp(r.op, op) == 0) return &r;
  }
  return nullptr;
}

// The knobs of one launch of `op` on x of layout cl and elements of elem_bytes: each debug knob
// where set for every launch, else (at by_op: 0, rows in flight -1) the op's row where it names
// one, else the base value.
inline Tuning tuning_for(const char* op, bool cl, int64_t elem_bytes) {
  static constexpr OpTuning kNoRow{"", false, 0, 0, 0, 0};  // every knob the base value
  const OpTuning* found = op_tuning_row(op, cl, elem_bytes);
  const OpTuning& row = found != nullptr ? *found : kNoRow;
  const auto pick = [](int knob, int by_op, int own, int base) {
    return knob != by_op ? knob : (own != 0 ? own : base);
  };
  return Tuning{pick(debug::tiles_per_sm, 0, row.tiles_per_sm, debug::kBaseTilesPerSm),
                debug::min_rows_per_thread,
                pick(debug::vec_rows_in_flight, -1, row.vec_rows_in_flight, 0),
                pick(debug::side_share, 0, row.side_share, debug::kBaseSideShare)};
}

}  // namespace cbam
