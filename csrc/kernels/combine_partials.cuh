// Second stage of the two-stage reductions, in the same launch as the first: the blocks of a
// group (the tiles that split one set of outputs: the row tiles of a column tile in reduce_r,
// the column tiles of a row tile in reduce_k) each write their partials [n, p, l], p their place
// in the group; the block that finishes last computes
//
//   out[n, l] = fold over p = 0 .. P-1 (in this order) of the partials [n, p, l]
//
// for the group's outputs l. Which block comes last varies from run to run; the order of the
// fold does not, so the results are the same bits every run. The pattern of the CUDA
// Programming Guide's memory-fence example and ATen's Reduce.cuh (mark_block_finished): every
// thread fences its partial stores, the block's thread 0 takes a ticket from the group's
// counter (an integer atomicAdd: the only atomic of the kernels), and the block whose ticket is
// P - 1 fences again, reads the partials from L2 (ld_cg) and writes the outputs. It also sets
// the counter back to zero for the next launch (launchers/common.h group_counters). Pass: the
// partials written once and read once, as with a second launch, without that launch.
#pragma once

#include "kernels/common.cuh"

namespace cbam {

// True in the block that finishes its group last (every thread of the block gets the same
// answer, and every partial of the group is visible to it). Every thread of the block calls it,
// after its own stores of partials. counter: the group's, zero at the launch; P: its blocks.
CBAM_DEVICE bool last_of_group(int* counter, int64_t P) {
  __shared__ int s_last;
  fence_gpu();      // this thread's partials, visible to the whole device before ...
  __syncthreads();  // ... thread 0 counts the block as done
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const int before = atomic_ticket(counter);
    s_last = before == P - 1;
    if (s_last) st(counter, 0);  // the whole group has counted: zero for the next launch
  }
  __syncthreads();
  const bool last = s_last != 0;
  if (last) fence_gpu();  // (acquire: the group's partials are read after it)
  return last;
}

// From this many partials an output, combine_group folds each output by a warp.
constexpr int64_t kWarpCombineMin = 64;

// The group's outputs out[n, l], l in [l_begin, l_end), by the block's threads.
// - P < kWarpCombineMin (every split of the networks' sites): one output a thread at a time,
//   folding the P partials [n, p, l] in order of p. (One load at a time: with four in flight,
//   the partials' registers cost the kernels' main loops blocks an SM.)
// - More (rows of millions of elements: a 4097 x 4097 map's row sums have 65568 partials): one
//   output a warp at a time. Lane j folds p in [j P / 32, (j + 1) P / 32) in order, 32 partials
//   at a time into a sub-total and those into its total; then the lanes' totals in order of j (a
//   xor tree in which the lane whose bit is set puts its partner's total first). A fixed order
//   still, and a float32 sum of 65568 partials off by about 1/50 as much as one thread's
//   running sum (the H200 run of 2026-11-28: 20 times the error of ATen's CPU sum there).
// blockDim.x * blockDim.y: a multiple of 32 (kBlockThreads).
template <typename Policy>
CBAM_DEVICE void combine_group(const Policy& pol, int64_t n, int64_t P, int64_t L,
                               int64_t l_begin, int64_t l_end) {
  using State = typename Policy::State;
  const int nthreads = static_cast<int>(blockDim.x * blockDim.y);
  const int tid = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  if (P < kWarpCombineMin) {
    for (int64_t l = l_begin + tid; l < l_end; l += nthreads) {
      State s = pol.init();
      for (int64_t p = 0; p < P; ++p) pol.combine(s, pol.load_partial((n * P + p) * L + l));
      pol.store_final(n * L + l, s);
    }
    return;
  }
  const int lane = tid & 31;
  const int64_t p0 = lane * P / 32, p1 = (lane + 1) * P / 32;  // (P >= 64: never empty)
  // (l is the warp's: every lane of it reaches the shuffles)
  for (int64_t l = l_begin + (tid >> 5); l < l_end; l += nthreads >> 5) {
    const int64_t base = n * P * L + l;
    State s = pol.init();
    for (int64_t p = p0; p < p1; p += 32) {
      const int64_t pe = p + 32 < p1 ? p + 32 : p1;
      State sub = pol.load_partial(base + p * L);
      for (int64_t q = p + 1; q < pe; ++q) pol.combine(sub, pol.load_partial(base + q * L));
      pol.combine(s, sub);
    }
    for (int m = 1; m < 32; m <<= 1) {
      State o = pol.shfl_xor(s, m);
      if (lane & m) {
        pol.combine(o, s);
        s = o;
      } else {
        pol.combine(s, o);
      }
    }
    if (lane == 0) pol.store_final(n * L + l, s);
  }
}

// The block's tile (common.cuh tile_id) again at the end of a kernel, from blockIdx in 32-bit
// arithmetic (a grid has fewer than 2^31 blocks): recomputed there, so that tile_id's 64-bit
// values need not stay live through the kernel's loops.
struct TileAtEnd {
  int n, rt, kt;
};
CBAM_DEVICE TileAtEnd tile_at_end(const Geom& g) {
  const unsigned nkt = static_cast<unsigned>(g.nkt), nrt = static_cast<unsigned>(g.nrt);
  const unsigned tb = tile_block(g.reverse), b = tb / nkt;
  return TileAtEnd{static_cast<int>(b / nrt), static_cast<int>(b % nrt),
                   static_cast<int>(tb % nkt)};
}

// Both steps for a reduction along k (reduce_k: partials [n, kt, r]; a group is a row tile's nkt
// blocks) or across rows (reduce_r: [n, rt, k]; a column tile's nrt blocks; L the columns of a
// sample, K or, for folded rows, the original row's K0): where the reduction is split, the block
// that finishes its group last writes the group's outputs (every thread of the block calls it).
template <bool OVER_K, typename Policy>
CBAM_DEVICE void finish_group(const Policy& pol, const Geom& g, int64_t L) {
  const int64_t P = OVER_K ? g.nkt : g.nrt;
  if (P == 1) return;
  const TileAtEnd t = tile_at_end(g);
  // the group: a row tile's column tiles (OVER_K) or a column tile's row tiles, and its outputs
  const int64_t groups = OVER_K ? g.nrt : g.nkt, group = OVER_K ? t.rt : t.kt;
  const int64_t span = OVER_K ? g.rows_per_tile : g.cols_per_tile;
  if (!last_of_group(g.counters + t.n * groups + group, P)) return;
  const int64_t l0 = group * span, l1 = l0 + span;
  combine_group(pol, t.n, P, L, l0, l1 < L ? l1 : L);
}

}  // namespace cbam
