// The channel head's matrix products (kernels/channel_head.cuh, channel_head_backward.cuh): one
// 32 x 32 tile of
//
//   out[row, col] = sum over kk in [k_begin, k_end) of A(row, kk) B(col, kk)
//
// per block of kBlockThreads = 256 threads. Thread (tx = t % 32, ty = t / 32) owns column
// col0 + tx and rows row0 + ty + 8 q, q < 4. The block stages 32-wide chunks of kk of both
// operands in shared memory, rows padded to 33 (the reads of a warp hit 32 banks: s_b by tx, s_a
// broadcast), each operand loaded along its contiguous axis: with A_ROW_FAST (B_ROW_FAST) a warp
// loads 32 consecutive rows of one kk, else 32 consecutive kk of one row, so global reads are
// coalesced whichever way the operand is stored. The sums are blocked: each chunk is summed on
// its own, then added to the running sum, in increasing kk (a fixed order: no race, the same
// result every run; rounding error grows with 32 + K / 32 terms, not K).
#pragma once

#include "kernels/combine_partials.cuh"

namespace cbam {

constexpr int kHeadTile = 32;  // rows and columns of a tile, and the staged chunk of kk
constexpr int kHeadRowsPerThread = kHeadTile * kHeadTile / kBlockThreads;  // 4
constexpr int kHeadRowStep = kBlockThreads / kHeadTile;                   // 8: ty's row stride

template <typename acc_t>
using HeadTileSmem = acc_t[kHeadTile][kHeadTile + 1];

// acc[q] += the tile's sums for rows ty + 8 q. load_a(r, kk) / load_b(c, kk) take a row / column
// of the tile (0..31) and a global kk in range; they return A / B, or 0 for a row / column
// outside the matrix. Every thread of the block must call it (it has barriers).
template <bool A_ROW_FAST, bool B_ROW_FAST, typename acc_t, typename LoadA, typename LoadB>
CBAM_DEVICE void head_tile_gemm(int64_t k_begin, int64_t k_end, const LoadA& load_a,
                                const LoadB& load_b, HeadTileSmem<acc_t>& s_a,
                                HeadTileSmem<acc_t>& s_b, acc_t (&acc)[kHeadRowsPerThread]) {
  const int tx = static_cast<int>(threadIdx.x) % kHeadTile;
  const int ty = static_cast<int>(threadIdx.x) / kHeadTile;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kHeadTile) {
    __syncthreads();  // the previous chunk is no longer read
    for (int e = static_cast<int>(threadIdx.x); e < kHeadTile * kHeadTile; e += kBlockThreads) {
      const int fast = e % kHeadTile, slow = e / kHeadTile;
      const int ra = A_ROW_FAST ? fast : slow, ka = A_ROW_FAST ? slow : fast;
      s_a[ra][ka] = k0 + ka < k_end ? load_a(ra, k0 + ka) : acc_t(0);
      const int rb = B_ROW_FAST ? fast : slow, kb = B_ROW_FAST ? slow : fast;
      s_b[rb][kb] = k0 + kb < k_end ? load_b(rb, k0 + kb) : acc_t(0);
    }
    __syncthreads();
    const int cols = k_end - k0 < kHeadTile ? static_cast<int>(k_end - k0) : kHeadTile;
    acc_t part[kHeadRowsPerThread];
    CBAM_UNROLL
    for (int q = 0; q < kHeadRowsPerThread; ++q) part[q] = acc_t(0);
    for (int kk = 0; kk < cols; ++kk) {
      const acc_t b = s_b[tx][kk];
      CBAM_UNROLL
      for (int q = 0; q < kHeadRowsPerThread; ++q) part[q] += b * s_a[ty + q * kHeadRowStep][kk];
    }
    CBAM_UNROLL
    for (int q = 0; q < kHeadRowsPerThread; ++q) acc[q] += part[q];
  }
}

// sum over r in [0, R) of v(r), blocked like the tiles' sums (one thread; the bias gradients).
template <typename acc_t, typename Value>
CBAM_DEVICE acc_t head_blocked_sum(int64_t R, const Value& v) {
  acc_t s = acc_t(0);
  for (int64_t r0 = 0; r0 < R; r0 += kHeadTile) {
    acc_t part = acc_t(0);
    const int64_t end = r0 + kHeadTile < R ? r0 + kHeadTile : R;
    for (int64_t r = r0; r < end; ++r) part += v(r);
    s += part;
  }
  return s;
}

// The tile of a product split over kk (grid (row tiles, column tiles, splits)): this block's
// sums acc (rows row0 + ty + 8 q of `rows`, column col of `cols`) stored as partials [split,
// rows, cols]; then, in the tile's last split to finish (combine_partials.cuh: a ticket of the
// tile's counter between fences), each element's partials summed in split order and handed to
// out(row, sum). Every thread of the block must call it.
template <typename acc_t, typename Out>
CBAM_DEVICE void head_split_tile_finish(const acc_t (&acc)[kHeadRowsPerThread], acc_t* partial,
                                        int* counters, int64_t rows, int64_t cols, int64_t row0,
                                        int64_t col, Out out) {
  const int ty = static_cast<int>(threadIdx.x) / kHeadTile;
  CBAM_UNROLL
  for (int q = 0; q < kHeadRowsPerThread; ++q) {
    const int64_t row = row0 + ty + q * kHeadRowStep;
    if (row < rows && col < cols) {
      st(partial + (static_cast<int64_t>(blockIdx.z) * rows + row) * cols + col, acc[q]);
    }
  }
  const int64_t splits = gridDim.z;
  if (!last_of_group(counters + blockIdx.y * gridDim.x + blockIdx.x, splits)) return;
  CBAM_NO_UNROLL
  for (int q = 0; q < kHeadRowsPerThread; ++q) {  // (one copy: acc is not read here)
    const int64_t row = row0 + ty + q * kHeadRowStep;
    if (row >= rows || col >= cols) continue;
    acc_t sum = acc_t(0);
    for (int64_t sp = 0; sp < splits; ++sp) sum += ld_cg(partial + (sp * rows + row) * cols + col);
    out(row, sum);
  }
}

}  // namespace cbam
