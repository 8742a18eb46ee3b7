// The channel head's matrix products (kernels/channel_head.cuh, channel_head_backward.cuh): one
// 32 x 32 tile of
//
//   out[row, col] = sum over kk in [k_begin, k_end) of A(row, kk) B(col, kk)
//
// per block of kBlockThreads = 256 threads. Thread (tx = t % 32, ty = t / 32) owns column
// col0 + tx and rows row0 + ty + 8 q, q < 4. The block stages 32-wide chunks of kk of both
// operands in shared memory, each row of a chunk as 8 vectors of 4 kk (HeadTileSmem; rows padded
// to 9 vectors, 36 elements): per 4 kk a thread reads one vector of B's row tx and one of each
// of its 4 rows of A (a broadcast: the warp's ty is one), 5 vector reads for 16 FMAs where
// element reads took 20 (the reads of B's rows hit every bank once a quarter warp). Each thread
// stages 4 elements of each operand a chunk, loaded along the operand's contiguous axis so that
// global reads are coalesced whichever way it is stored: with A_ROW_FAST (B_ROW_FAST) a warp
// loads 8 consecutive rows (a 32-byte sector of float) at each of 4 kk, and its stores meet 32
// banks; else 32 consecutive kk of one row. What depends on a staged row alone (its pointer, a
// pool's index) is computed once, before the chunk loop (head_rows). In the launches with a
// block or two an SM (PREFETCH), the next chunk's elements are loaded into registers before the
// current chunk is summed, so the loads' latency hides behind the FMAs: no other block is there
// to hide it behind.
//
// The sums are blocked: each chunk is summed on its own, then added to the running sum, in
// increasing kk (a fixed order: no race, the same result every run; rounding error grows with
// 32 + K / 32 terms, not K). A chunk's last vector may run past k_end: both operands are staged
// as 0 there, and a product 0 * 0 added to a chunk's sum leaves the running sum's bits as they
// were (it can only turn a chunk sum of -0 into +0, and a running sum, which starts at +0, is
// never -0).
#pragma once

#include "kernels/combine_partials.cuh"

namespace cbam {

constexpr int kHeadTile = 32;  // rows and columns of a tile, and the staged chunk of kk
constexpr int kHeadRowsPerThread = kHeadTile * kHeadTile / kBlockThreads;  // 4
constexpr int kHeadRowStep = kBlockThreads / kHeadTile;                   // 8: ty's row stride
constexpr int kHeadQuad = 4;                                              // kk a vector read
constexpr int kHeadQuads = kHeadTile / kHeadQuad;                         // 8 a chunk's row
constexpr int kHeadStaged = kHeadTile * kHeadTile / kBlockThreads;        // 4 an operand a thread

template <typename acc_t>
using HeadQuad = Vec<acc_t, kHeadQuad>;
// [row][vector of 4 kk]; a 9th vector pads the row to 36 elements: the B reads of a quarter warp
// (rows tx .. tx + 7) then start 4 banks apart and cover the 32 banks once.
template <typename acc_t>
using HeadTileSmem = HeadQuad<acc_t>[kHeadTile][kHeadQuads + 1];

template <typename acc_t>
CBAM_DEVICE acc_t& head_smem_at(HeadTileSmem<acc_t>& s, int row, int kk) {
  return s[row][kk / kHeadQuad].val[kk % kHeadQuad];
}

// A thread's staging slots s < 4, slot e = threadIdx.x + 256 s of the chunk's 1024 elements:
// ROW_FAST, 8 consecutive rows a kk, 4 kk, then 4 row groups and 8 kk groups (a warp: rows
// r .. r + 7 at kk .. kk + 3, banks 4 row + kk: all 32), so the thread's four slots are one row
// at kk, kk + 8, kk + 16, kk + 24; else 32 consecutive kk of one row, the thread's four slots
// four rows 8 apart at one kk.
template <bool ROW_FAST>
CBAM_DEVICE int head_slot_row(int s) {
  const int t = static_cast<int>(threadIdx.x);
  return ROW_FAST ? t % 8 + 8 * ((t / kHeadTile) % 4) : t / kHeadTile + kHeadRowStep * s;
}
template <bool ROW_FAST>
CBAM_DEVICE int head_slot_kk(int s) {
  const int t = static_cast<int>(threadIdx.x);
  return ROW_FAST ? (t / 8) % 4 + 4 * (t / (4 * kHeadTile)) + 8 * s : t % kHeadTile;
}

// An operand's loaders for the rows a thread stages, made once before the chunk loop: row(r)
// returns a callable kk -> A(r, kk) (0 for a row outside the matrix) that holds what depends on
// the row alone (its pointer, whether it is in range, a pool's index), so a chunk's loads are a
// multiply-add and a load each.
template <typename Row, int N>
struct HeadRows {
  Row rows[N];
};

template <bool ROW_FAST, typename RowFn>
CBAM_DEVICE auto head_rows(const RowFn& row) {
  using Row = decltype(row(0));
  if constexpr (ROW_FAST) {
    return HeadRows<Row, 1>{{row(head_slot_row<true>(0))}};
  } else {
    static_assert(kHeadStaged == 4, "head_rows: four slots");
    return HeadRows<Row, kHeadStaged>{{row(head_slot_row<false>(0)), row(head_slot_row<false>(1)),
                                       row(head_slot_row<false>(2)),
                                       row(head_slot_row<false>(3))}};
  }
}

// The loader of a row of a stored matrix (head_rows' row functions): element kk at
// base[offset + kk stride] where the row is in range, 0 outside it; without a stride, kk is
// contiguous (no stride held in the loader).
template <typename acc_t>
CBAM_DEVICE auto head_matrix_row(bool in, const acc_t* base, int64_t offset, int64_t stride) {
  const acc_t* src = in ? base + offset : nullptr;
  return [=](int64_t kk) { return in ? ld(src + kk * stride) : acc_t(0); };
}
template <typename acc_t>
CBAM_DEVICE auto head_matrix_row(bool in, const acc_t* base, int64_t offset) {
  const acc_t* src = in ? base + offset : nullptr;
  return [=](int64_t kk) { return in ? ld(src + kk) : acc_t(0); };
}

// This thread's staged elements of the chunk at k0 (0 past k_end).
template <bool ROW_FAST, typename Row, int N, typename acc_t>
CBAM_DEVICE void head_fetch(int64_t k0, int64_t k_end, const HeadRows<Row, N>& rows,
                            acc_t (&v)[kHeadStaged]) {
  CBAM_UNROLL
  for (int s = 0; s < kHeadStaged; ++s) {
    const int64_t kk = k0 + head_slot_kk<ROW_FAST>(s);
    v[s] = kk < k_end ? rows.rows[ROW_FAST ? 0 : s](kk) : acc_t(0);
  }
}

template <bool ROW_FAST, typename acc_t>
CBAM_DEVICE void head_stage(HeadTileSmem<acc_t>& sm, const acc_t (&v)[kHeadStaged]) {
  CBAM_UNROLL
  for (int s = 0; s < kHeadStaged; ++s) {
    head_smem_at(sm, head_slot_row<ROW_FAST>(s), head_slot_kk<ROW_FAST>(s)) = v[s];
  }
}

// part[q] += sum over the chunk's kk < 4 quads of B(tx, kk) A(rows[q], kk), kk in order: one
// vector of B's row and one of each A row per 4 kk, two such steps an iteration (unrolled
// further, nvcc issues all of a chunk's 40 vector reads at once: 20 to 50 registers more a
// thread, and fewer blocks an SM).
template <typename acc_t, int ROWS>
CBAM_DEVICE void head_chunk_sum(const HeadTileSmem<acc_t>& s_a, const HeadTileSmem<acc_t>& s_b,
                                int quads, acc_t (&part)[ROWS]) {
  const int tx = static_cast<int>(threadIdx.x) % kHeadTile;
  const int ty = static_cast<int>(threadIdx.x) / kHeadTile;
  const auto step = [&](int kq) {
    const HeadQuad<acc_t> b = s_b[tx][kq];
    HeadQuad<acc_t> a[ROWS];
    CBAM_UNROLL
    for (int q = 0; q < ROWS; ++q) a[q] = s_a[ty + q * kHeadRowStep][kq];
    CBAM_UNROLL
    for (int j = 0; j < kHeadQuad; ++j) {
      CBAM_UNROLL
      for (int q = 0; q < ROWS; ++q) part[q] += b.val[j] * a[q].val[j];
    }
  };
  int kq = 0;
  CBAM_NO_UNROLL
  for (; kq + 1 < quads; kq += 2) {
    step(kq);
    step(kq + 1);
  }
  if (kq < quads) step(kq);
}

// The vectors of a chunk of `cols` kk (the last may be partial: zeros past k_end).
CBAM_DEVICE int head_quads(int64_t cols) {
  return cols < kHeadTile ? static_cast<int>((cols + kHeadQuad - 1) / kHeadQuad) : kHeadQuads;
}

// head_tile_gemm's default extra: no loads of its own, A staged as loaded.
struct HeadNoExtra {
  CBAM_DEVICE void fetch(int64_t, int64_t) {}
  template <typename acc_t>
  CBAM_DEVICE void stage(int64_t, acc_t (&)[kHeadStaged]) {}
};

// acc[q] += the tile's sums for rows ty + 8 q. row_a(r) / row_b(c) take a row / column of the
// tile (0..31) and return its loader (head_rows): kk -> A / B for a global kk in range, 0 for a
// row / column outside the matrix. PREFETCH: the next chunk's loads are issued before this
// chunk is summed, for the launches whose grids hold a block or two an SM and so have no other
// block to hide a chunk's load latency behind (8 registers of float more: with the rows'
// loaders, 74 to 89 registers a thread of float, two or three blocks an SM); else loaded right
// before they are staged (the backward's parameter tiles, a grid of many blocks: about 64
// registers, four blocks an SM).
// extra: what a caller loads and does besides the loaders (HeadNoExtra: nothing), so that the
// loaders only load and a chunk's loads are issued together (an operation on a loaded value
// inside a loader, a store of it or an add of a second load, made ptxas wait for each load
// before the next slot's: the forward's hidden layer waited for P's 4 loads of a chunk in turn,
// where it wrote P from its loader, and waits so for the blend's). extra.fetch(k0, k_end) is
// called right after the chunk's loads are issued; extra.stage(k0, va) once the chunk's loads
// are in, before A is staged, with this thread's elements of A (slot s: row
// head_slot_row<A_ROW_FAST>(s), kk k0 + head_slot_kk<A_ROW_FAST>(s); 0 past k_end or outside
// the matrix), which it may change. Every thread of the block must call it (it has barriers).
template <bool A_ROW_FAST, bool B_ROW_FAST, bool PREFETCH, typename acc_t, typename RowA,
          typename RowB, typename Extra = HeadNoExtra>
CBAM_DEVICE void head_tile_gemm(int64_t k_begin, int64_t k_end, const RowA& row_a,
                                const RowB& row_b, HeadTileSmem<acc_t>& s_a,
                                HeadTileSmem<acc_t>& s_b, acc_t (&acc)[kHeadRowsPerThread],
                                Extra extra = Extra{}) {
  const auto load_a = head_rows<A_ROW_FAST>(row_a);
  const auto load_b = head_rows<B_ROW_FAST>(row_b);
  acc_t va[kHeadStaged], vb[kHeadStaged];
  if constexpr (PREFETCH) {
    head_fetch<A_ROW_FAST>(k_begin, k_end, load_a, va);
    head_fetch<B_ROW_FAST>(k_begin, k_end, load_b, vb);
    extra.fetch(k_begin, k_end);
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kHeadTile) {
    if constexpr (!PREFETCH) {
      head_fetch<A_ROW_FAST>(k0, k_end, load_a, va);
      head_fetch<B_ROW_FAST>(k0, k_end, load_b, vb);
      extra.fetch(k0, k_end);
    }
    __syncthreads();  // the previous chunk is no longer read
    extra.stage(k0, va);
    head_stage<A_ROW_FAST>(s_a, va);
    head_stage<B_ROW_FAST>(s_b, vb);
    __syncthreads();
    if constexpr (PREFETCH) {
      if (k0 + kHeadTile < k_end) {  // the next chunk's loads, in flight while this one is summed
        head_fetch<A_ROW_FAST>(k0 + kHeadTile, k_end, load_a, va);
        head_fetch<B_ROW_FAST>(k0 + kHeadTile, k_end, load_b, vb);
        extra.fetch(k0 + kHeadTile, k_end);
      }
    }
    acc_t part[kHeadRowsPerThread];
    CBAM_UNROLL
    for (int q = 0; q < kHeadRowsPerThread; ++q) part[q] = acc_t(0);
    head_chunk_sum(s_a, s_b, head_quads(k_end - k0), part);
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
  // each row's partials in split order; the 4 rows' loads of a split issued together (a row at
  // a time, the thread waited for each row's loads before the next row's: 4 round trips to L2
  // where 1 will do)
  acc_t sum[kHeadRowsPerThread];
  bool in[kHeadRowsPerThread];
  CBAM_UNROLL
  for (int q = 0; q < kHeadRowsPerThread; ++q) {
    sum[q] = acc_t(0);
    in[q] = row0 + ty + q * kHeadRowStep < rows && col < cols;
  }
  for (int64_t sp = 0; sp < splits; ++sp) {
    CBAM_UNROLL
    for (int q = 0; q < kHeadRowsPerThread; ++q) {
      const int64_t row = row0 + ty + q * kHeadRowStep;
      if (in[q]) sum[q] += ld_cg(partial + (sp * rows + row) * cols + col);
    }
  }
  CBAM_UNROLL
  for (int q = 0; q < kHeadRowsPerThread; ++q) {  // (unrolled: sum stays in registers)
    if (in[q]) out(row0 + ty + q * kHeadRowStep, sum[q]);
  }
}

}  // namespace cbam
