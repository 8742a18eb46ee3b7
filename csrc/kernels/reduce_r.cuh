// Reduction over the strided axis r of x [N, R, K] (channels-first pool over C, channels-last
// pool over S, and the matching scale gradients).
//
//   out[n, k] = fold over r of Policy::add(x[n, r, k], w[n, r])       (pool_policies.cuh)
//
// Pass: reads x once. Tiles as in common.cuh; the row tiles are the first stage of the
// reduction (nrt splits of R). Threads along k keep one State per column (with the policy's
// value of the column, kHasKept, staged once per tile); the weights of the tile's rows are
// staged in shared memory kChunkRows at a time. The TY threads of a column then combine through
// shared memory in a fixed tree (any TY: the launcher may give each vector of a short row its
// own thread, TX = K / VEC up to kMaxSpanCols, TY = 256 / TX, so that a block's rows are read as
// one contiguous span, launchers/common.h make_geom). Thread row 0 writes the final value
// (nrt == 1) or the partial [n, rt, k], and the last of the column tile's nrt blocks to finish
// folds each column's partials in order (finish_group, combine_partials.cuh). Requires
// VEC == 1 or K % VEC == 0, but for SHIFT.
// U: a thread loads U of its rows (i, i + TY, ... of a chunk) before it folds them, in order, so
// any U gives the same bits; the launcher takes more where the whole grid is resident at once
// (few blocks, long walks: more loads in flight per thread, not more threads). Two kernels:
// reduce_r_kernel (U = 1) and reduce_r_rows_kernel (U = 2, 4; bounded), one body
// (reduce_r_tile).
// FOLD: rows folded G at a time (Fold, common.cuh; the vector path of rows of K0 % VEC != 0),
// one tile spanning the folded row (nkt == 1, the launcher's span lanes). A thread's column v
// folds the original rows r G + j of original column k (FoldPos; in increasing order);
// after the column tree, the G folded columns k + j K0 of each original column k combine in
// order of j (a fixed order) before the store.
// SHIFT: rows of K % VEC != 0 as they are (those that do not fold: G does not divide R, or the
// folded row is longer than one tile spans), each thread's VEC columns of a row from the
// 16-byte window they start in and the next lane's (load_rows_shifted); columns past K are
// loaded but neither folded nor stored.
#pragma once

#include "kernels/combine_partials.cuh"

namespace cbam {

// Blocks of 256 threads an SM that the instances with more rows in flight keep at least, which
// the launcher counts on where it picks U by the size of the grid (launchers/reduction.h,
// with_reduce_r_rows), and which their __launch_bounds__ give ptxas: U = 4, 3 (at most 80
// registers); U = 2, 4 (64); 2 for both where the policy's state or weight is over 12 bytes
// (the lp / lse pools, float64: up to 128 registers). tests/test_codegen.py checks them against
// ptxas's report.
template <int U, typename Policy>
constexpr int reduce_r_min_blocks() {
  constexpr bool big =
      sizeof(typename Policy::State) > 12 || sizeof(typename Policy::Weight) > 12;
  return U == 1 ? 1 : big ? 2 : U == 4 ? 3 : 4;
}

// The shared memory of one block: the weights of a chunk of rows, the column states for the
// tree, and the policy's values of the tile's columns (kHasKept). Declared in each kernel
// function (the simulator poisons those between blocks, not a helper's).
template <typename Policy, int VEC, bool FOLD>
struct ReduceRShared {
  using acc_t = typename Policy::acc_t;
  static constexpr int kKept =
      Policy::kHasKept ? (FOLD ? kFoldedSlots<VEC> : kMaxSpanCols * VEC) : 1;
  typename Policy::Weight w[stages_weights<Policy>() ? kChunkRows : 1];
  typename Policy::State state[kBlockThreads * VEC];
  acc_t kept[kKept];
};

// The block's tile (the kernels below): U rows of loads in flight per thread.
template <typename T, int VEC, int U, bool FOLD, typename Policy, bool SHIFT>
CBAM_DEVICE void reduce_r_tile(const T* __restrict__ x, const Policy& pol, const Geom& g,
                               const Fold& f, ReduceRShared<Policy, VEC, FOLD>& sh) {
  static_assert(!(SHIFT && FOLD), "rows shifted or folded");
  static_assert(!(SHIFT && U > 1), "shifted rows: one in flight");
  using acc_t = typename Policy::acc_t;
  using State = typename Policy::State;
  auto& s_w = sh.w;
  auto& s_state = sh.state;
  const TileId t = tile_id(g, VEC);
  const bool active = t.k0 < g.K;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = ty * TX + tx;
  const int G = FOLD ? f.G : 1;
  const FoldPos p0 = fold_pos(static_cast<int>(t.k0), FOLD ? f.K0 : 1);  // column 0's (FOLD)

  State s[VEC];
  for (int v = 0; v < VEC; ++v) s[v] = pol.init();
  if constexpr (Policy::kHasKept) {  // the policy's values of the tile's columns, loaded once
    auto& s_kept = sh.kept;
    const auto kept = [&](int64_t k) { return pol.kept(t.n, k); };
    if constexpr (FOLD) {
      stage_k_side_folded<VEC>(s_kept, t, f.K0, kept);
      FoldPos p = p0;
      for (int v = 0; v < VEC && active; ++v, fold_next(p, f.K0)) {
        pol.set_kept(s[v], s_kept[folded_slot<VEC>(p.k, t, f.K0)]);
      }
    } else {
      acc_t kv[VEC];
      stage_k_side<VEC>(s_kept, t, kept, kv);
      for (int v = 0; v < VEC; ++v) pol.set_kept(s[v], kv[v]);
    }
  }

  // (folded) rows of one chunk of staged weights; a policy without weights (an empty Weight: the
  // unscaled pools) takes the tile's rows in one chunk, with no barrier (and no chunk bound
  // recomputed in the row loop: ptxas did, 5 instructions a row)
  constexpr bool kStaged = stages_weights<Policy>();
  const int crows = kStaged ? kChunkRows / G : static_cast<int>(t.r_end - t.r_begin);
  for (int64_t cb = t.r_begin; cb < t.r_end; cb += crows) {
    const int64_t rest = t.r_end - cb;
    const int clen = rest < crows ? static_cast<int>(rest) : crows;
    if constexpr (kStaged) {
      __syncthreads();  // the previous chunk's weights are no longer read
      for (int i = tid; i < clen * G; i += TX * TY) s_w[i] = pol.weight(t.n, cb * G + i);
      __syncthreads();
    }
    // folds the chunk's row i (values xv of the thread's columns)
    const auto fold_row = [&](int i, const acc_t (&xv)[VEC]) {
      const int64_t r = cb + i;
      if constexpr (FOLD) {  // original row (cb + i) G + p.j, column p.k
        FoldPos p = p0;
        for (int v = 0; v < VEC; ++v, fold_next(p, f.K0)) {
          pol.add(s[v], xv[v], staged_weight(s_w, i * G + p.j), static_cast<int>(r) * G + p.j,
                  p.k);
        }
      } else {
        // (a copy: read through the reference, the weight was loaded again for each column,
        // 3 to 7 instructions a row more)
        const typename Policy::Weight w = staged_weight(s_w, i);
        for (int v = 0; v < VEC; ++v) {
          if (SHIFT && t.k0 + v >= g.K) break;  // (past the row)
          pol.add(s[v], xv[v], w, static_cast<int>(r), t.k0 + v);
        }
      }
    };
    if constexpr (SHIFT) {
      // every lane the same trip count, lanes past the row too (load_rows_shifted's shuffles)
      for (int ib = 0; ib < clen; ib += U * TY) {
        int64_t e[U];
        bool has[U];
        acc_t xv[U][VEC];
        shifted_step_rows<U>(t, g, cb, clen, ib, e, has);
        load_rows_shifted<U, VEC>(x, e, has, g.N * g.R * g.K, xv);
        CBAM_UNROLL
        for (int u = 0; u < U; ++u) {
          if (active && ib + ty + u * TY < clen) fold_row(ib + ty + u * TY, xv[u]);
        }
      }
    } else if (active) {
      // The thread's rows i0, i0 + TY, ... of the chunk, in order, through a pointer stepped
      // along them: U rows a trip while all U are in the chunk (rows in flight, load_raw), then
      // the rest one a trip.
      const int64_t row_step = static_cast<int64_t>(TY) * g.K;
      const T* xp = x + (t.n * g.R + cb + ty) * g.K + t.k0;
      int i0 = ty;
      if constexpr (U > 1) {
        for (; i0 + (U - 1) * TY < clen; i0 += U * TY, xp += U * row_step) {
          Vec<T, VEC> raw[U];
          CBAM_UNROLL
          for (int u = 0; u < U; ++u) raw[u] = load_raw<VEC>(xp + u * row_step);
          CBAM_UNROLL
          for (int u = 0; u < U; ++u) {
            acc_t xv[VEC];
            to_acc<VEC>(raw[u], xv);
            fold_row(i0 + u * TY, xv);
          }
        }
      }
      for (; i0 < clen; i0 += TY, xp += row_step) {
        acc_t xv[VEC];
        load_acc<VEC>(xp, xv);
        fold_row(i0, xv);
      }
    }
  }

  // (the states v-major but for folded rows: common.cuh tree_slot)
  for (int v = 0; v < VEC; ++v) s_state[tree_slot<VEC, !FOLD>(tid, v)] = s[v];
  __syncthreads();
  // n states of a column left: the first n - h take in those h above them (h = ceil(n / 2); for
  // a power of two, the halving tree)
  for (int n = TY; n > 1;) {
    const int h = (n + 1) / 2;
    if (ty < n - h) {
      for (int v = 0; v < VEC; ++v) {
        pol.combine(s_state[tree_slot<VEC, !FOLD>(tid, v)],
                    s_state[tree_slot<VEC, !FOLD>(tid + h * TX, v)]);
      }
    }
    __syncthreads();
    n = h;
  }
  if constexpr (FOLD) {
    // thread row 0's states are the folded columns 0 .. G K0 - 1 in order (k_begin == 0); those
    // of original column k: k + jj K0, jj < G
    for (int k = tid; k < f.K0; k += TX * TY) {
      State sk = s_state[tree_slot_of_column<VEC, !FOLD>(k)];
      for (int jj = 1; jj < G; ++jj) {
        pol.combine(sk, s_state[tree_slot_of_column<VEC, !FOLD>(k + jj * f.K0)]);
      }
      if (g.nrt == 1) {
        pol.store_final(t.n * f.K0 + k, sk);
      } else {
        pol.store_partial((t.n * g.nrt + t.rt) * f.K0 + k, sk);
      }
    }
  } else if (ty == 0 && active) {
    for (int v = 0; v < VEC; ++v) {
      const int64_t k = t.k0 + v;
      if (SHIFT && k >= g.K) break;
      if (g.nrt == 1) {
        pol.store_final(t.n * g.K + k, s_state[tree_slot<VEC, !FOLD>(tid, v)]);
      } else {
        pol.store_partial((t.n * g.nrt + t.rt) * g.K + k, s_state[tree_slot<VEC, !FOLD>(tid, v)]);
      }
    }
  }
  // a column's nrt partials, by the last block of the column tile's group (nrt > 1)
  finish_group<false>(pol, g, FOLD ? f.K0 : g.K);  // (FOLD: nkt == 1, the original columns)
}

// One row of loads in flight per thread. No __launch_bounds__: with one, nvcc gave these
// instances more registers (55 to 69 for 16-bit folded rows) and fewer blocks an SM.
template <typename T, int VEC, bool FOLD, typename Policy, bool SHIFT = false>
CBAM_GLOBAL void reduce_r_kernel(const T* __restrict__ x, Policy pol, Geom g, Fold f) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ ReduceRShared<Policy, VEC, FOLD> sh;
  reduce_r_tile<T, VEC, 1, FOLD, Policy, SHIFT>(x, pol, g, f, sh);
}

// U (2 or 4) rows of loads in flight per thread. Bounded: without, ptxas sank each row's load
// to just before its fold to save registers (55 for 16-bit x at U = 4), one row in flight again.
template <typename T, int VEC, int U, bool FOLD, typename Policy>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads, reduce_r_min_blocks<U, Policy>())
    reduce_r_rows_kernel(const T* __restrict__ x, Policy pol, Geom g, Fold f) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  static_assert(U > 1, "one row in flight: reduce_r_kernel");
  __shared__ ReduceRShared<Policy, VEC, FOLD> sh;
  reduce_r_tile<T, VEC, U, FOLD, Policy, false>(x, pol, g, f, sh);
}

// The kernel of U rows in flight.
template <typename T, int VEC, int U, bool FOLD, typename Policy>
constexpr auto reduce_r_entry() {
  if constexpr (U == 1) {
    return &reduce_r_kernel<T, VEC, FOLD, Policy>;
  } else {
    return &reduce_r_rows_kernel<T, VEC, U, FOLD, Policy>;
  }
}

}  // namespace cbam
