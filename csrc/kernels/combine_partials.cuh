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
//
// Groups of very many partials (launchers/common.h combine_in_second_launch; a 4097 x 4097 map's
// row sums, split into 65568 column tiles) take a second launch instead, combine_groups_kernel
// (below), where a warp folds each output: one thread's running sum of that many float32
// partials was off by about 20 times the error of the CPU kernel's sum (the H200 run of
// 2026-11-28). It is a kernel of its own so that its registers (loads in flight, the warp's
// tree) stay out of the reductions' main loops: folded inside them, even rolled, the extra path
// moved 22 of pool.cu's 76 instances up a register class or more and made one spill.
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

// The group's outputs out[n, l], l in [l_begin, l_end), by the block's threads (one output a
// thread at a time): each folds the P partials [n, p, l] in order of p. (One load at a time:
// with four in flight, the partials' registers cost the kernels' main loops blocks an SM.)
template <typename Policy>
CBAM_DEVICE void combine_group(const Policy& pol, int64_t n, int64_t P, int64_t L,
                               int64_t l_begin, int64_t l_end) {
  const int nthreads = static_cast<int>(blockDim.x * blockDim.y);
  const int tid = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  for (int64_t l = l_begin + tid; l < l_end; l += nthreads) {
    typename Policy::State s = pol.init();
    for (int64_t p = 0; p < P; ++p) pol.combine(s, pol.load_partial((n * P + p) * L + l));
    pol.store_final(n * L + l, s);
  }
}

// The second launch of a split whose groups have too many partials to fold in the last block
// (launchers/common.h combine_in_second_launch; the first launch's blocks then find no group
// finished: launchers/common.h group_counters, idle):
//
//   out[n, l] = fold over p = 0 .. P-1 (in this order) of the partials [n, p, l]
//
// for every n and l < L, one output a warp (8 a block). Lane j folds p in [j P / 32, (j + 1) P /
// 32): kCombineBatch partials loaded at once and folded in order into a batch total, 4 batches
// into a sub-total, the sub-totals into the lane's total; then the lanes' totals in order of j (a
// xor tree in which the lane whose bit is set puts its partner's total first). A fixed order:
// the same bits every run. One pass over the partials.
constexpr int kCombineBatch = 8;
constexpr int kCombineWarps = kBlockThreads / 32;  // outputs a block

template <bool OVER_K, typename Policy>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads)
    combine_groups_kernel(Policy pol, Geom g, int64_t L) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  using State = typename Policy::State;
  constexpr int B = kCombineBatch;
  const int64_t P = OVER_K ? g.nkt : g.nrt;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31;
  const int64_t per_sample = (L + kCombineWarps - 1) / kCombineWarps;
  const int64_t n = blockIdx.x / per_sample;
  const int64_t l = (blockIdx.x % per_sample) * kCombineWarps + (tid >> 5);
  if (l >= L) return;  // (a whole warp: l is the warp's)
  const int64_t p0 = lane * P / 32, p1 = (lane + 1) * P / 32, base = n * P * L + l;
  State s = pol.init();
  for (int64_t p = p0; p < p1; p += 4 * B) {
    State sub = pol.init();
    for (int64_t pb = p; pb < p + 4 * B && pb < p1; pb += B) {
      State v[B];
      CBAM_UNROLL
      for (int i = 0; i < B; ++i) v[i] = pb + i < p1 ? pol.load_partial(base + (pb + i) * L)
                                                     : pol.init();
      CBAM_UNROLL
      for (int i = 1; i < B; ++i) {
        if (pb + i < p1) pol.combine(v[0], v[i]);
      }
      pol.combine(sub, v[0]);
    }
    pol.combine(s, sub);
  }
  CBAM_UNROLL
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
