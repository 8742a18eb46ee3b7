// Q1 of the backward: both gate gradients in ONE pass over g and x, x viewed as [N, R, K]:
//
//   out_r[n, r] = sum_k g[n,r,k] x[n,r,k] gk[n,k]     out_k[n, k] = sum_r g[n,r,k] x[n,r,k] gr[n,r]
//
// (channels-first: gr = gc, gk = gs, out_r = rc, out_k = rs; channels-last the other way round;
// a missing gate is 1). Pass: reads g and x once each. Tiles as in common.cuh: gk of the tile's
// columns is staged once (stage_k_side) and each thread keeps that of its VEC columns in
// registers, with the column sums of its columns; gr of the tile's rows is staged in shared
// memory. Per row, the TX lanes combine the row sum by xor shuffles and lane 0
// writes the partial part_r[n, kt, r]; after the rows, the TY column sums of each column combine
// in a fixed shared-memory tree and row 0 writes part_k[n, rt, k]. When nkt (nrt) is 1 the
// partial buffer is the output itself; otherwise the last block of the row (column) tile's group
// adds the partials in order into out_r (out_k) (finish_group, combine_partials.cuh). No
// floating-point atomics. Requires VEC == 1 or K % VEC == 0 (rows of other
// lengths: backward_reduce_folded_kernel, below), but for SHIFT: rows of K % VEC != 0 as they
// are, each thread's VEC columns of a row from the 16-byte window they start in and the next
// lane's (load_rows_shifted), its columns past K neither summed nor stored.
#pragma once

#include "kernels/combine_partials.cuh"

namespace cbam {

// Plain sums for combine_group (the second stage of backward_reduce, combine_partials.cuh).
template <typename acc_t_>
struct SumPolicy {
  using acc_t = acc_t_;
  const acc_t* part;  // [N, P, L]
  acc_t* out;         // [N, L]
  struct State {
    acc_t sum;
  };
  CBAM_DEVICE State init() const {
    State s;
    s.sum = acc_t(0);
    return s;
  }
  CBAM_DEVICE void combine(State& a, const State& b) const { a.sum += b.sum; }
  CBAM_DEVICE State shfl_xor(const State& s, int lane_mask) const {
    State o;
    o.sum = __shfl_xor_sync(0xffffffffu, s.sum, lane_mask);
    return o;
  }
  CBAM_DEVICE State load_partial(int64_t o) const {
    State s;
    s.sum = ld_cg(part + o);
    return s;
  }
  CBAM_DEVICE void store_final(int64_t o, const State& s) const { st(out + o, s.sum); }
};

// Both kernels' steps through a chunk of rows: the gates gr of its `count` rows (x's rows
// first .. first + count - 1; 1 without gr) staged in s_gr, between barriers (the previous
// chunk's gates are no longer read; these are written) ...
template <typename acc_t>
CBAM_DEVICE void stage_chunk_gates(acc_t* s_gr, const acc_t* gr, int64_t first, int count,
                                   int tid, int nthreads) {
  __syncthreads();
  for (int i = tid; i < count; i += nthreads) {
    s_gr[i] = gr != nullptr ? ld(gr + first + i) : acc_t(1);
  }
  __syncthreads();
}

// ... and the loads of a step: U rows of g and x, rows ib + u TY + ty of the chunk at row cb (of
// clen rows), the thread's VEC columns (zeros outside the chunk or the row; SHIFT: every lane,
// those past the row too, load_rows_shifted). off0: the offset of the thread's first (row
// ib + ty, column t.k0), stepped by the caller (recomputed, a 64-bit multiply-add of the row,
// it took a tenth of the loop).
template <int U, int VEC, bool SHIFT = false, typename T, typename acc_t>
CBAM_DEVICE void load_step_rows(const T* grad, const T* x, const TileId& t, const Geom& g,
                                int64_t cb, int clen, int ib, int64_t off0, bool active,
                                acc_t (&gv)[U][VEC], acc_t (&xv)[U][VEC]) {
  if constexpr (SHIFT) {
    int64_t e[U];
    bool has[U];
    shifted_step_rows<U>(t, g, cb, clen, ib, e, has);
    load_rows_shifted<U, VEC>(grad, e, has, g.N * g.R * g.K, gv);
    load_rows_shifted<U, VEC>(x, e, has, g.N * g.R * g.K, xv);
  } else {
    // Loads first, U rows in flight (load_raw): unguarded where all U > 1 rows are in the chunk
    // (and the thread's columns in the row), guarded otherwise.
    const int ty = static_cast<int>(threadIdx.y), TY = static_cast<int>(blockDim.y);
    if (U > 1 && active && ib + (U - 1) * TY + ty < clen) {
      Vec<T, VEC> graw[U], xraw[U];
      for (int u = 0; u < U; ++u) {
        graw[u] = load_raw<VEC>(grad + off0 + static_cast<int64_t>(u) * TY * g.K);
        xraw[u] = load_raw<VEC>(x + off0 + static_cast<int64_t>(u) * TY * g.K);
      }
      for (int u = 0; u < U; ++u) {
        to_acc<VEC>(graw[u], gv[u]);
        to_acc<VEC>(xraw[u], xv[u]);
      }
    } else {
      for (int u = 0; u < U; ++u) {
        if (active && ib + u * TY + ty < clen) {
          load_acc<VEC>(grad + off0 + static_cast<int64_t>(u) * TY * g.K, gv[u]);
          load_acc<VEC>(x + off0 + static_cast<int64_t>(u) * TY * g.K, xv[u]);
        }
      }
    }
  }
}

// (__launch_bounds__: 64 registers, 80 for two rows in flight or the shifted rows' windows; the
// 16-bit two-row instance took 81 unbounded, two blocks an SM.)
template <typename T, int VEC, int U, typename acc_t, bool SHIFT = false>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads, U > 1 || SHIFT ? 3 : 4)
    backward_reduce_kernel(const T* __restrict__ grad, const T* __restrict__ x, const acc_t* gr,
                           const acc_t* gk, acc_t* part_r, acc_t* part_k, acc_t* out_r,
                           acc_t* out_k, Geom g, bool need_r, bool need_k) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ acc_t s_gr[kChunkRows];
  __shared__ acc_t s_col[kBlockThreads * VEC];

  const TileId t = tile_id(g, VEC);
  const bool active = t.k0 < g.K;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = ty * TX + tx;

  __shared__ acc_t s_gk[32 * VEC];
  acc_t wk[VEC];
  stage_k_side<VEC>(
      s_gk, t, [&](int64_t k) { return gk != nullptr ? ld(gk + t.n * g.K + k) : acc_t(1); },
      wk);
  acc_t col[VEC];
  for (int v = 0; v < VEC; ++v) col[v] = acc_t(0);

  for (int64_t cb = t.r_begin; cb < t.r_end; cb += kChunkRows) {
    const int64_t rest = t.r_end - cb;
    const int clen = rest < kChunkRows ? static_cast<int>(rest) : kChunkRows;
    stage_chunk_gates(s_gr, gr, t.n * g.R + cb, clen, tid, TX * TY);
    int64_t off0 = (t.n * g.R + cb + ty) * g.K + t.k0;  // (the thread's row of the step)
    // the same trip count in every thread
    for (int ib = 0; ib < clen; ib += U * TY, off0 += static_cast<int64_t>(U) * TY * g.K) {
      acc_t gv[U][VEC] = {}, xv[U][VEC] = {};
      load_step_rows<U, VEC, SHIFT>(grad, x, t, g, cb, clen, ib, off0, active, gv, xv);
      for (int u = 0; u < U; ++u) {
        const int i = ib + u * TY + ty;
        acc_t row = acc_t(0);
        if (active && i < clen) {
          const acc_t wr = s_gr[i];
          for (int v = 0; v < VEC; ++v) {
            if (SHIFT && t.k0 + v >= g.K) break;  // (past the row)
            const acc_t p = gv[u][v] * xv[u][v];
            row += p * wk[v];
            col[v] += p * wr;
          }
        }
        if (need_r) {  // every lane, every u: the shuffles need the whole warp
          // masks TX / 2 ... 1 (TX a power of two <= 32), unrolled: a predicated shuffle and
          // add a step, not a loop's 7 instructions (the row's tree was a fifth of the loop)
          CBAM_UNROLL
          for (int lane_mask = 16; lane_mask > 0; lane_mask /= 2) {
            if (lane_mask < TX) row += __shfl_xor_sync(0xffffffffu, row, lane_mask);
          }
          if (tx == 0 && i < clen) st(part_r + (t.n * g.nkt + t.kt) * g.R + cb + i, row);
        }
      }
    }
  }

  if (need_k) {
    // (the sums v-major: common.cuh tree_slot)
    for (int v = 0; v < VEC; ++v) s_col[tree_slot<VEC>(tid, v)] = col[v];
    __syncthreads();
    for (int half = TY / 2; half > 0; half /= 2) {
      if (ty < half) {
        for (int v = 0; v < VEC; ++v) {
          s_col[tree_slot<VEC>(tid, v)] += s_col[tree_slot<VEC>(tid + half * TX, v)];
        }
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
      for (int v = 0; v < VEC; ++v) {
        if (SHIFT && t.k0 + v >= g.K) break;
        st(part_k + (t.n * g.nrt + t.rt) * g.K + t.k0 + v, s_col[tree_slot<VEC>(tid, v)]);
      }
    }
  }
  // the second stages (combine_partials.cuh): a row's nkt partials by the row tile's last
  // block (counters [0, N nrt)), a column's nrt partials by the column tile's (those after)
  if (need_r) finish_group<true>(SumPolicy<acc_t>{part_r, out_r}, g, g.R);
  if (need_k) {
    Geom gk = g;
    gk.counters = g.counters + g.N * g.nrt;
    finish_group<false>(SumPolicy<acc_t>{part_k, out_k}, gk, g.K);
  }
}

// backward_reduce for rows whose length K0 is not a multiple of VEC, folded G at a time into
// whole vectors (Fold, common.cuh; the launcher's span lanes make one tile span a folded row:
// TX = G K0 / VEC, nkt == 1). The same sums:
// - out_k: each thread sums its folded columns over its rows as above (gr of original row
//   r G + j, j the column's row within the folded row); after the column tree, the G folded
//   columns k + jj K0 of original column k add in order of jj, and row 0 writes part_k.
// - out_r: a thread's VEC columns lie in at most two original rows (K0 >= VEC), j0 and j0 + 1
//   (FoldPos); it sums its products of each, in order, into shared memory (s_row), and after a
//   barrier one thread per original row of the step adds those of the lanes that hold the row,
//   lane by lane in order, and writes out_r (no partials: the tile holds every column).
// Pass: reads g and x once each.
template <typename T, int VEC, int U, typename acc_t>
CBAM_GLOBAL void backward_reduce_folded_kernel(const T* __restrict__ grad,
                                               const T* __restrict__ x, const acc_t* gr,
                                               const acc_t* gk, acc_t* out_r, acc_t* part_k,
                                               acc_t* out_k, Geom g, Fold f, bool need_r,
                                               bool need_k) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ acc_t s_gr[kChunkRows];
  __shared__ acc_t s_col[kBlockThreads * VEC];
  __shared__ acc_t s_gk[kFoldedSlots<VEC>];
  __shared__ acc_t s_row[U][kBlockThreads][2];  // a step's sums of each thread's (two) rows

  const TileId t = tile_id(g, VEC);  // (k_begin == 0: nkt == 1)
  const bool active = t.k0 < g.K;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = ty * TX + tx;
  const int G = f.G, K0 = f.K0;

  stage_k_side_folded<VEC>(s_gk, t, K0, [&](int64_t k) {
    return gk != nullptr ? ld(gk + t.n * K0 + k) : acc_t(1);
  });
  const FoldPos p0 = fold_pos(static_cast<int>(t.k0), K0);
  const int split = K0 - p0.k;  // columns v < split lie in row p0.j, the others in p0.j + 1
  acc_t wk[VEC] = {};
  if (active) {
    FoldPos p = p0;
    for (int v = 0; v < VEC; ++v, fold_next(p, K0)) wk[v] = s_gk[folded_slot<VEC>(p.k, t, K0)];
  }
  acc_t col[VEC];
  for (int v = 0; v < VEC; ++v) col[v] = acc_t(0);

  const int crows = kChunkRows / G;  // (folded) rows of one chunk of staged r gates
  for (int64_t cb = t.r_begin; cb < t.r_end; cb += crows) {
    const int64_t rest = t.r_end - cb;
    const int clen = rest < crows ? static_cast<int>(rest) : crows;
    stage_chunk_gates(s_gr, gr, (t.n * g.R + cb) * G, clen * G, tid, TX * TY);
    int64_t off0 = (t.n * g.R + cb + ty) * g.K + t.k0;  // (the thread's row of the step)
    // the same trip count in every thread
    for (int ib = 0; ib < clen; ib += U * TY, off0 += static_cast<int64_t>(U) * TY * g.K) {
      acc_t gv[U][VEC] = {}, xv[U][VEC] = {};
      load_step_rows<U, VEC>(grad, x, t, g, cb, clen, ib, off0, active, gv, xv);
      for (int u = 0; u < U; ++u) {
        const int i = ib + u * TY + ty;
        acc_t row0 = acc_t(0), row1 = acc_t(0);
        if (active && i < clen) {
          const acc_t wr0 = s_gr[i * G + p0.j];
          const acc_t wr1 = p0.j + 1 < G ? s_gr[i * G + p0.j + 1] : wr0;
          for (int v = 0; v < VEC; ++v) {
            const acc_t p = gv[u][v] * xv[u][v];
            const bool first = v < split;
            if (first) {
              row0 += p * wk[v];
            } else {
              row1 += p * wk[v];
            }
            col[v] += p * (first ? wr0 : wr1);
          }
        }
        if (need_r) {
          s_row[u][tid][0] = row0;
          s_row[u][tid][1] = row1;
        }
      }
      if (need_r) {
        __syncthreads();
        // original row jq of folded row ib + uq TY + yq: lanes [jq K0 / VEC, ((jq + 1) K0 - 1) /
        // VEC]; a lane's first sum is that of the row of its first column, which is row jq
        // unless the lane starts before jq K0 (only the first lane can: then row jq is its
        // second sum). (A comparison, not the division l VEC / K0 == jq: one a lane, about 20
        // instructions, in a loop that a few threads of the block run while the others wait.)
        for (int q = tid; q < U * TY * G; q += TX * TY) {
          const int qg = q / G, jq = q - qg * G, uq = qg / TY, yq = qg - uq * TY;
          const int i = ib + uq * TY + yq;
          if (i < clen) {
            acc_t sum = acc_t(0);
            const int l1 = ((jq + 1) * K0 - 1) / VEC, row_start = jq * K0;
            for (int l = row_start / VEC; l <= l1; ++l) {
              sum += s_row[uq][yq * TX + l][l * VEC >= row_start ? 0 : 1];
            }
            st(out_r + (t.n * g.R + cb + i) * G + jq, sum);
          }
        }
        __syncthreads();  // s_row is written again at the next step
      }
    }
  }

  if (need_k) {
    // (the sums v-major: common.cuh tree_slot)
    for (int v = 0; v < VEC; ++v) s_col[tree_slot<VEC>(tid, v)] = col[v];
    __syncthreads();
    // n sums of a column left: the first n - h take in those h above them (h = ceil(n / 2); TY
    // need not be a power of two)
    for (int n = TY; n > 1;) {
      const int h = (n + 1) / 2;
      if (ty < n - h) {
        for (int v = 0; v < VEC; ++v) {
          s_col[tree_slot<VEC>(tid, v)] += s_col[tree_slot<VEC>(tid + h * TX, v)];
        }
      }
      __syncthreads();
      n = h;
    }
    // row 0's sums are the folded columns in order; original column k's: k + jj K0, jj < G
    for (int k = tid; k < K0; k += TX * TY) {
      acc_t sum = s_col[tree_slot_of_column<VEC>(k)];
      for (int jj = 1; jj < G; ++jj) sum += s_col[tree_slot_of_column<VEC>(k + jj * K0)];
      st(part_k + (t.n * g.nrt + t.rt) * K0 + k, sum);
    }
    // a column's nrt partials, by the last block of the sample's (nkt == 1)
    finish_group<false>(SumPolicy<acc_t>{part_k, out_k}, g, K0);
  }
}

}  // namespace cbam
