// The apply: y[n,c,s] = x[n,c,s] * gc[n,c] * gs[n,s] (in this order, in acc_t; a missing gate
// is 1).
// Pass: reads x once, writes y once. x and y viewed as [N, R, K] (common.cuh); the gate along k
// is staged once per tile (stage_k_side) and held in registers per thread (VEC columns), the gate
// along r is staged in shared memory per chunk of rows, so the small gates are read once per
// tile. `cl` says whether k is the channel axis (channels-last). Requires VEC == 1 or
// K % VEC == 0.
// FOLD: rows folded G at a time (Fold, common.cuh; the vector path of rows of K0 % VEC != 0).
// A thread's VEC columns then belong to original rows r G + j and columns k (FoldPos),
// fixed for the thread: the tile's k gates are staged once per original column
// (stage_k_side_folded) and held in registers, the r gates are staged G per folded row and read
// per element.
#pragma once

#include <type_traits>

#include "kernels/common.cuh"

namespace cbam {

// (__launch_bounds__: without, ptxas sank the second row's load of U = 2 to after the first
// row's products, one row in flight.)
template <typename T, int VEC, int U, bool FOLD, typename acc_t>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads, 4)
    apply_gates_kernel(const T* __restrict__ x, T* __restrict__ y, const acc_t* gr,
                       const acc_t* gk, Geom g, Fold f, bool cl) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ acc_t s_gr[kChunkRows];
  const TileId t = tile_id(g, VEC);
  const bool active = t.k0 < g.K;
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = threadIdx.y * TX + threadIdx.x;
  const int G = FOLD ? f.G : 1;
  const int64_t K0 = FOLD ? f.K0 : g.K;

  __shared__ acc_t s_gk[FOLD ? kFoldedSlots<VEC> : kMaxSpanCols * VEC];
  const auto gate_k = [&](int64_t k) { return gk != nullptr ? ld(gk + t.n * K0 + k) : acc_t(1); };
  acc_t wk[VEC];
  const FoldPos p0 = fold_pos(static_cast<int>(t.k0), FOLD ? f.K0 : 1);  // column 0's (FOLD)
  if constexpr (FOLD) {
    stage_k_side_folded<VEC>(s_gk, t, f.K0, gate_k);
    FoldPos p = p0;
    for (int v = 0; v < VEC && active; ++v, fold_next(p, f.K0)) {
      wk[v] = s_gk[folded_slot<VEC>(p.k, t, f.K0)];
    }
  } else {
    stage_k_side<VEC>(s_gk, t, gate_k, wk);
  }
  const int crows = kChunkRows / G;  // (folded) rows of one chunk of staged r gates
  for (int64_t cb = t.r_begin; cb < t.r_end; cb += crows) {
    const int64_t rest = t.r_end - cb;
    const int clen = rest < crows ? static_cast<int>(rest) : crows;
    __syncthreads();
    for (int i = tid; i < clen * G; i += TX * TY) {
      s_gr[i] = gr != nullptr ? ld(gr + (t.n * g.R + cb) * G + i) : acc_t(1);
    }
    __syncthreads();
    if (!active) continue;
    // The thread's rows i0, i0 + TY, ... of the chunk, through pointers stepped along them: U
    // rows a trip while all U are in the chunk (rows in flight, load_raw), then the rest one a
    // trip. CL: cl as a constant (the product's order is the layout's; decided per element,
    // both orders were issued, one predicated off).
    const auto walk = [&](auto cl_c) {
      constexpr bool CL = decltype(cl_c)::value;
      // the chunk's row i of x, values v_ (converted), through y's row at out
      const auto apply_row = [&](int i, acc_t(&v_)[VEC], T* out) {
        FoldPos p = p0;
        for (int v = 0; v < VEC; ++v) {
          const acc_t wr = s_gr[FOLD ? i * G + p.j : i];
          v_[v] = CL ? v_[v] * wk[v] * wr : v_[v] * wr * wk[v];
          if constexpr (FOLD) fold_next(p, f.K0);
        }
        store_from_acc<VEC>(out, v_);
      };
      const int64_t row_step = static_cast<int64_t>(TY) * g.K;
      const int64_t o0 = (t.n * g.R + cb + threadIdx.y) * g.K + t.k0;
      const T* xp = x + o0;
      T* yp = y + o0;
      int i0 = threadIdx.y;
      if constexpr (U > 1) {
        for (; i0 + (U - 1) * TY < clen; i0 += U * TY, xp += U * row_step, yp += U * row_step) {
          Vec<T, VEC> raw[U];
          for (int u = 0; u < U; ++u) raw[u] = load_raw<VEC>(xp + u * row_step);
          for (int u = 0; u < U; ++u) {
            acc_t v_[VEC];
            to_acc<VEC>(raw[u], v_);
            apply_row(i0 + u * TY, v_, yp + u * row_step);
          }
        }
      }
      for (; i0 < clen; i0 += TY, xp += row_step, yp += row_step) {
        acc_t v_[VEC];
        load_acc<VEC>(xp, v_);
        apply_row(i0, v_, yp);
      }
    };
    if (cl) {
      walk(std::true_type{});
    } else {
      walk(std::false_type{});
    }
  }
}

}  // namespace cbam
