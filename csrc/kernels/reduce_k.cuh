// Reduction over the contiguous axis k of x [N, R, K] (channels-first pool over S, channels-last
// pool over C, and the matching scale gradients).
//
//   out[n, r] = fold over k of Policy::add(x[n, r, k], w[n, k])       (pool_policies.cuh)
//
// Pass: reads x once. Tiles as in common.cuh, with up to kReduceKVectors vectors per lane and row
// (cols_per_tile = TX * VEC * that). The weights of the tile's columns are read from global
// memory once per tile into shared memory (stage_k_side, lane-fastest: no bank conflicts when the
// lanes read them for every element); a policy's value of the row (kHasKept) once per row and
// tile. Each thread folds its vectors of a row in order of k: with KV == kReduceKVectors it first
// issues the loads of all of them (at most kReduceKVectors; raw, converted when folded), so a
// thread has that many 16-byte loads in flight, not one (KV == 1: load, fold, load, ...; the
// same result bit for bit). Then the TX lanes of the row combine
// by xor shuffles (fixed tree), and lane 0 writes the result of the row: the final value when
// the row fits one column tile (nkt == 1), else the partial [n, kt, r], and the last of the row
// tile's nkt blocks to finish folds each row's partials in order (finish_group,
// combine_partials.cuh). Requires VEC == 1 or K % VEC == 0
// (other rows: reduce_k_rows.cuh, reduce_k_shifted.cuh).
//
// UR > 1 (with KV == kReduceKVectors): a thread takes UR of its rows at a time (rows r, r + TY,
// ... r + (UR - 1) TY) and issues the loads of all its vectors of them first, then folds and
// combines each row, so it has up to UR * KV 16-byte loads in flight. The launcher takes it
// where the grid is small enough to be resident at once with this instance's fewer blocks an SM
// (reduce_k_rows_blocks): few, long rows, as at a 7x7 channels-last site of 2048 channels (64
// samples x 2 column tiles = 128 blocks at batch 64, one per SM, whose bytes in flight were the
// TY rows of each column tile at once: half of what hides DRAM's latency). The tiles, each
// row's fold and its combine are those of UR == 1, so the results are the same bits.
#pragma once

#include "kernels/combine_partials.cuh"

namespace cbam {

constexpr int kReduceKVectors = 4;  // vectors per lane and row of one reduce_k tile, at most
constexpr int kReduceKRows = 2;  // rows in flight per thread of the small-grid instance

// That instance's blocks an SM, at least: 3 (at most 80 registers); 2 for the states of more
// than 12 bytes and the weights of more than three accumulators (the lp / lse pools and their
// scale gradient: 16-bit x spilled at 80, the gradient once its groups' last blocks also fold
// the partials, combine_partials.cuh).
template <typename Policy>
constexpr int reduce_k_rows_blocks() {
  using acc_t = typename Policy::acc_t;
  return Policy::kPartialBytes > 12 || sizeof(typename Policy::Weight) > 3 * sizeof(acc_t) ? 2
                                                                                           : 3;
}

// A row's policy value (kHasKept) into its state s: one load by the row's lane 0, then a shuffle
// to the row's TX lanes. Every lane of the warp calls it (rows past t.r_end too).
template <typename Policy>
CBAM_DEVICE void set_row_kept(const Policy& pol, typename Policy::State& s, const TileId& t,
                              int64_t r) {
  if constexpr (Policy::kHasKept) {
    using acc_t = typename Policy::acc_t;
    const int lane = static_cast<int>((threadIdx.y * blockDim.x + threadIdx.x) % 32);
    const acc_t kv = threadIdx.x == 0 && r < t.r_end ? pol.kept(t.n, r) : acc_t(1);
    pol.set_kept(s, __shfl_sync(0xffffffffu, kv, lane - static_cast<int>(threadIdx.x)));
  }
}

// A row's result, combined over its lanes, from lane 0: the final value where the row fits one
// column tile, else the partial [n, kt, r].
template <typename Policy>
CBAM_DEVICE void store_row(const Policy& pol, const typename Policy::State& s, const TileId& t,
                           const Geom& g, int64_t r) {
  if (threadIdx.x == 0 && r < t.r_end) {
    if (g.nkt == 1) {
      pol.store_final(t.n * g.R + r, s);
    } else {
      pol.store_partial((t.n * g.nkt + t.kt) * g.R + r, s);
    }
  }
}

// (KV > 1: at most 64 registers, 4 blocks an SM; 80 and 3 for float64, where 64 spilled. UR > 1:
// reduce_k_rows_blocks.)
template <typename T, int VEC, int KV, int UR, typename Policy>
CBAM_GLOBAL void __launch_bounds__(kBlockThreads, KV == 1          ? 1
                                                  : UR > 1         ? reduce_k_rows_blocks<Policy>()
                                                  : sizeof(T) == 8 ? 3
                                                                   : 4)
    reduce_k_kernel(const T* __restrict__ x, Policy pol, Geom g) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  static_assert(KV == 1 || KV == kReduceKVectors, "KV: one vector at a time, or all of them");
  static_assert(UR == 1 || (UR == kReduceKRows && KV == kReduceKVectors),
                "UR: rows in flight, with all of a lane's vectors of each");
  using acc_t = typename Policy::acc_t;
  using State = typename Policy::State;
  __shared__ typename Policy::Weight s_w[32 * VEC * kReduceKVectors];  // at k_slot
  const TileId t = tile_id(g, VEC);
  const int TX = blockDim.x, TY = blockDim.y;
  stage_k_side<VEC>(s_w, t, [&](int64_t k) { return pol.weight(t.n, k); });

  if constexpr (UR > 1) {
    // the lane's vector j of a row is columns k0 + j * TX * VEC (a tile has at most KV per lane)
    const int step = TX * VEC;
    const int nv = static_cast<int>((t.k_end - t.k0 + step - 1) / step);  // <= KV; may be <= 0
    for (int64_t rb = t.r_begin; rb < t.r_end; rb += static_cast<int64_t>(TY) * UR) {
      State s[UR];
      // Loads first: UR rows of up to KV vectors in flight (load_raw). Unguarded on the trips
      // whose rows are all in the tile with KV vectors each (the same for every thread of the
      // block); guarded on the others.
      const bool whole = nv == KV && rb + static_cast<int64_t>(UR) * TY <= t.r_end;
      Vec<T, VEC> raw[UR][KV];
      CBAM_UNROLL
      for (int u = 0; u < UR; ++u) {
        const int64_t r = rb + threadIdx.y + static_cast<int64_t>(u) * TY;
        s[u] = pol.init();
        set_row_kept(pol, s[u], t, r);
      }
      if (whole) {
        CBAM_UNROLL
        for (int u = 0; u < UR; ++u) {
          const T* p = x + (t.n * g.R + rb + threadIdx.y + static_cast<int64_t>(u) * TY) * g.K +
                       t.k0;
          CBAM_UNROLL
          for (int j = 0; j < KV; ++j) raw[u][j] = load_raw<VEC>(p + j * step);
        }
      } else {
        CBAM_UNROLL
        for (int u = 0; u < UR; ++u) {
          const int64_t r = rb + threadIdx.y + static_cast<int64_t>(u) * TY;
          const T* p = x + (t.n * g.R + r) * g.K + t.k0;
          CBAM_UNROLL
          for (int j = 0; j < KV; ++j) {  // (zeros past the tile: never folded, but shifted)
            raw[u][j] = r < t.r_end && j < nv ? load_raw<VEC>(p + j * step) : Vec<T, VEC>{};
          }
        }
      }
      CBAM_UNROLL
      for (int u = 0; u < UR; ++u) {  // each row's fold as below (UR == 1), in order of k
        const int64_t r = rb + threadIdx.y + static_cast<int64_t>(u) * TY;
        if (r < t.r_end) {
          int ki = static_cast<int>(t.k0);  // K < 2^31 (launcher check)
          int slot = k_slot<VEC>(0, 0);
          CBAM_NO_UNROLL
          for (int j = 0; j < nv; ++j, ki += step, slot += step) {
            acc_t xv[VEC];
            to_acc<VEC>(raw[u][0], xv);
            for (int v = 0; v < VEC; ++v) pol.add(s[u], xv[v], s_w[slot + v * TX], ki + v, r);
            CBAM_UNROLL
            for (int q = 0; q + 1 < KV; ++q) raw[u][q] = raw[u][q + 1];
          }
        }
      }
      for (int lane_mask = TX / 2; lane_mask > 0; lane_mask /= 2) {
        CBAM_UNROLL
        for (int u = 0; u < UR; ++u) pol.combine(s[u], pol.shfl_xor(s[u], lane_mask));
      }
      CBAM_UNROLL
      for (int u = 0; u < UR; ++u) {  // (store_row's body: through it, nvcc spilled 20 bytes
        const int64_t r = rb + threadIdx.y + static_cast<int64_t>(u) * TY;  // in the 16-bit lp /
        if (threadIdx.x == 0 && r < t.r_end) {                              // lse instance)
          if (g.nkt == 1) {
            pol.store_final(t.n * g.R + r, s[u]);
          } else {
            pol.store_partial((t.n * g.nkt + t.kt) * g.R + r, s[u]);
          }
        }
      }
    }
  } else {
    for (int64_t rb = t.r_begin; rb < t.r_end; rb += TY) {  // the same trip count in every thread
      const int64_t r = rb + threadIdx.y;
      State s = pol.init();
      set_row_kept(pol, s, t, r);
      if (r < t.r_end && KV == 1) {
        // a pointer stepped along the row (not the row's offset recomputed per vector)
        const T* p = x + (t.n * g.R + r) * g.K + t.k0;
        const int step = TX * VEC;
        int slot = k_slot<VEC>(0, 0);  // k_slot<VEC>(j, 0) of the lane's vector j
        for (int64_t k = t.k0; k < t.k_end; k += step, p += step, slot += step) {
          acc_t xv[VEC];
          load_acc<VEC>(p, xv);
          const int ki = static_cast<int>(k);  // K < 2^31 (launcher check)
          for (int v = 0; v < VEC; ++v) pol.add(s, xv[v], s_w[slot + v * TX], ki + v, r);
        }
      } else if (r < t.r_end) {
        // the lane's vector j is columns k0 + j * TX * VEC (a tile has at most KV per lane)
        const T* p = x + (t.n * g.R + r) * g.K + t.k0;
        const int step = TX * VEC;
        const int nv = static_cast<int>((t.k_end - t.k0 + step - 1) / step);  // <= KV; may be <= 0
        Vec<T, VEC> raw[KV] = {};  // (entries j >= nv are never folded)
        CBAM_UNROLL
        for (int j = 0; j < KV; ++j) {  // loads first
          if (j < nv) raw[j] = load_raw<VEC>(p + j * step);
        }
        // Then the fold, in order of k, one vector a trip from raw[0], the rest shifting down
        // (fixed register indices): one copy of the fold in the code, whose 4 * VEC unrolled
        // elements took up to 128 registers (16-bit x) with the weights' shared loads hoisted.
        int ki = static_cast<int>(t.k0);  // K < 2^31 (launcher check)
        int slot = k_slot<VEC>(0, 0);
        CBAM_NO_UNROLL
        for (int j = 0; j < nv; ++j, ki += step, slot += step) {
          acc_t xv[VEC];
          to_acc<VEC>(raw[0], xv);
          for (int v = 0; v < VEC; ++v) pol.add(s, xv[v], s_w[slot + v * TX], ki + v, r);
          CBAM_UNROLL
          for (int q = 0; q + 1 < KV; ++q) raw[q] = raw[q + 1];
        }
      }
      for (int lane_mask = TX / 2; lane_mask > 0; lane_mask /= 2) {
        pol.combine(s, pol.shfl_xor(s, lane_mask));
      }
      store_row(pol, s, t, g, r);
    }
  }
  // a row's nkt partials, by the last block of the row tile's group (nkt > 1)
  finish_group<true>(pol, g, g.R);
}

}  // namespace cbam
