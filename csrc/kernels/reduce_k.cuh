// Reduction over the contiguous axis k of x [N, R, K] (channels-first pool over S, channels-last
// pool over C, and the matching scale gradients).
//
//   out[n, r] = fold over k of Policy::add(x[n, r, k], w[n, k])       (pool_policies.cuh)
//
// Pass: reads x once. Tiles as in common.cuh, with up to kReduceKVectors vectors per lane and row
// in each of up to reduce_k_groups groups (cols_per_tile = TX * VEC * kReduceKVectors * groups,
// make_geom). The weights of the tile's columns are read from global memory once per tile into
// shared memory (stage_k_side, lane-fastest: no bank conflicts when the lanes read them for
// every element; a policy without weights, an empty Weight, stages none); a policy's value of
// the row (kHasKept) once per row and tile. Each thread folds its vectors of a row in order of
// k, a group at a time: with KV == kReduceKVectors it first issues the loads of the group's
// vectors (at most kReduceKVectors; raw, converted when folded), so a thread has that many
// 16-byte loads in flight, not one (KV == 1: load, fold, load, ...; the same result bit for
// bit). Then the TX lanes of the row combine
// by xor shuffles (fixed tree), and lane 0 writes the result of the row: the final value when
// the row fits one column tile (nkt == 1), else the partial [n, kt, r], and the last of the row
// tile's nkt blocks to finish folds each row's partials in order (finish_group,
// combine_partials.cuh). Requires VEC == 1 or K % VEC == 0
// (other rows: reduce_k_rows.cuh, reduce_k_shifted.cuh).
//
// UR > 1 (with KV == kReduceKVectors): a thread takes UR of its rows at a time (rows r, r + TY,
// ... r + (UR - 1) TY) and issues the loads of a group of its vectors of each first, then folds and
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

// Whether fold_vectors unrolls a group's vectors: not where that ran out of registers under the
// kernel's bounds (ptxas spilled the 16-bit rows-in-flight instance, UR > 1, and the policies
// whose state or weight is over 12 bytes: lp / lse, float64).
template <typename T, int UR, typename Policy>
constexpr bool unroll_fold() {
  return (UR == 1 || sizeof(T) >= 4) && sizeof(typename Policy::State) <= 12 &&
         sizeof(typename Policy::Weight) <= 12;
}

// Groups of kReduceKVectors vectors a lane takes of a row in one tile, at most (the tile then
// spans TX VEC kReduceKVectors groups columns): as many as 12 KB of staged weights hold (the
// policy's Weight for each column), 8 for a policy without weights (an empty Weight: the
// unscaled pools). A lane folds its groups of a row one after the other, each with its loads in
// flight, and the row's lanes combine once: a float32 row of 3136 (56x56 channels-first) was 7
// tiles of 512 columns, each lane folding 16 elements, then a 5-step shuffle tree, the row's
// store and a partial for the second stage, all per 16 elements: about 24 instructions an
// element, against a budget of 28 at the H200's bandwidth. (How many a tile takes: make_geom.)
constexpr int kReduceKGroupsMost = 8;
constexpr int kReduceKWeightBytes = 12288;
template <typename Policy, int VEC>
constexpr int reduce_k_groups() {
  if constexpr (!stages_weights<Policy>()) {
    return kReduceKGroupsMost;
  } else {
    constexpr int fit = kReduceKWeightBytes / (32 * VEC * kReduceKVectors *
                                               static_cast<int>(sizeof(typename Policy::Weight)));
    return fit < 1 ? 1 : fit > kReduceKGroupsMost ? kReduceKGroupsMost : fit;
  }
}

// Folds the lane's nv (<= KV, may be <= 0) vectors raw[0 .. nv) of row r, the tile's lane
// vectors j0 ... (vector j: columns k0 + j step ...), into s, in order of k. With UNROLL where
// nv == KV (every group but a row's last in a tile), each vector from its own registers; else
// one copy of the fold, one vector a trip from raw[0], the rest shifting down (fixed register
// indices: the shift cost 12 moves a vector of 4 floats, 20 byte permutes of 8 bfloat16, a
// third of the loop).
template <int KV, bool UNROLL, int VEC, typename T, typename Policy>
CBAM_DEVICE void fold_vectors(const Policy& pol, typename Policy::State& s,
                              Vec<T, VEC> (&raw)[KV], int nv, int j0, int k0, int step,
                              const typename Policy::Weight* s_w, int64_t r) {
  using acc_t = typename Policy::acc_t;
  const int TX = static_cast<int>(blockDim.x);
  const auto fold = [&](const Vec<T, VEC>& rv, int ki, int slot) {
    acc_t xv[VEC];
    to_acc<VEC>(rv, xv);
    for (int v = 0; v < VEC; ++v) {
      pol.add(s, xv[v], staged_weight(s_w, slot + v * TX), ki + v, r);
    }
  };
  const int ki0 = k0 + j0 * step, slot0 = k_slot<VEC>(j0, 0);  // k_slot<VEC>(j, 0) steps by step
  if (UNROLL && nv == KV) {
    CBAM_UNROLL
    for (int j = 0; j < KV; ++j) fold(raw[j], ki0 + j * step, slot0 + j * step);
  } else {
    int ki = ki0, slot = slot0;
    CBAM_NO_UNROLL
    for (int j = 0; j < nv; ++j, ki += step, slot += step) {
      fold(raw[0], ki, slot);
      CBAM_UNROLL
      for (int q = 0; q + 1 < KV; ++q) raw[q] = raw[q + 1];
    }
  }
}

// Folds the lane's nvt vectors of row r (at p: vector j at p + j step) into s, KV at a time (a
// group): each group's loads first (KV 16-byte loads in flight; guarded on a row's last, partial
// group), then its fold (fold_vectors).
template <int KV, bool UNROLL, int VEC, typename T, typename Policy>
CBAM_DEVICE void fold_row_groups(const T* p, const Policy& pol, typename Policy::State& s,
                                 int nvt, int k0, int step, const typename Policy::Weight* s_w,
                                 int64_t r) {
  CBAM_NO_UNROLL
  for (int j0 = 0; j0 < nvt; j0 += KV, p += KV * step) {
    const int nv = nvt - j0 < KV ? nvt - j0 : KV;
    Vec<T, VEC> raw[KV];
    if (nv == KV) {
      CBAM_UNROLL
      for (int j = 0; j < KV; ++j) raw[j] = load_raw<VEC>(p + j * step);
    } else {
      CBAM_UNROLL
      for (int j = 0; j < KV; ++j) {  // (zeros past the tile: never folded, but shifted)
        raw[j] = j < nv ? load_raw<VEC>(p + j * step) : Vec<T, VEC>{};
      }
    }
    fold_vectors<KV, UNROLL>(pol, s, raw, nv, j0, k0, step, s_w, r);
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
  using Weight = typename Policy::Weight;
  constexpr bool kUnroll = unroll_fold<T, UR, Policy>();
  // the tile's weights at k_slot (none without weights: an array of one)
  constexpr int kSlots =
      stages_weights<Policy>() ? 32 * VEC * kReduceKVectors * reduce_k_groups<Policy, VEC>() : 1;
  __shared__ Weight s_w[kSlots];
  const TileId t = tile_id(g, VEC);
  const int TX = blockDim.x, TY = blockDim.y;
  if constexpr (stages_weights<Policy>()) {
    stage_k_side<VEC>(s_w, t, [&](int64_t k) { return pol.weight(t.n, k); });
  }
  // the lane's vector j of a row is columns k0 + j step; nvt of them in the tile (may be <= 0)
  const int step = TX * VEC;
  const int nvt = static_cast<int>((t.k_end - t.k0 + step - 1) / step);
  const int k0 = static_cast<int>(t.k0);  // K < 2^31 (launcher check)

  if constexpr (UR > 1) {
    for (int64_t rb = t.r_begin; rb < t.r_end; rb += static_cast<int64_t>(TY) * UR) {
      State s[UR];
      CBAM_UNROLL
      for (int u = 0; u < UR; ++u) {
        const int64_t r = rb + threadIdx.y + static_cast<int64_t>(u) * TY;
        s[u] = pol.init();
        set_row_kept(pol, s[u], t, r);
      }
      if (nvt > KV) {
        // Rows of several groups a lane (tiles_per_sm small enough that both the groups and this
        // instance's resident grid are taken): a row at a time, as UR == 1 (a loop over the UR
        // rows' groups spilled 16-bit x at 80 registers).
        constexpr bool kUnrollRow = unroll_fold<T, 1, Policy>();
        CBAM_UNROLL
        for (int u = 0; u < UR; ++u) {  // (unrolled: s[u] in registers)
          const int64_t r = rb + threadIdx.y + static_cast<int64_t>(u) * TY;
          if (r < t.r_end) {
            fold_row_groups<KV, kUnrollRow, VEC>(x + (t.n * g.R + r) * g.K + k0, pol, s[u], nvt,
                                                 k0, step, s_w, r);
          }
        }
      } else {
        // Loads first: UR rows of up to KV vectors in flight (load_raw). Unguarded on the trips
        // whose rows are all in the tile with KV vectors each (the same for every thread of the
        // block); guarded on the others.
        const bool whole = nvt == KV && rb + static_cast<int64_t>(UR) * TY <= t.r_end;
        Vec<T, VEC> raw[UR][KV];
        if (whole) {
          CBAM_UNROLL
          for (int u = 0; u < UR; ++u) {
            const T* p = x + (t.n * g.R + rb + threadIdx.y + static_cast<int64_t>(u) * TY) * g.K +
                         k0;
            CBAM_UNROLL
            for (int j = 0; j < KV; ++j) raw[u][j] = load_raw<VEC>(p + j * step);
          }
        } else {
          CBAM_UNROLL
          for (int u = 0; u < UR; ++u) {
            const int64_t r = rb + threadIdx.y + static_cast<int64_t>(u) * TY;
            const T* p = x + (t.n * g.R + r) * g.K + k0;
            CBAM_UNROLL
            for (int j = 0; j < KV; ++j) {  // (zeros past the tile: never folded, but shifted)
              raw[u][j] = r < t.r_end && j < nvt ? load_raw<VEC>(p + j * step) : Vec<T, VEC>{};
            }
          }
        }
        CBAM_UNROLL
        for (int u = 0; u < UR; ++u) {  // each row's fold as below (UR == 1), in order of k
          const int64_t r = rb + threadIdx.y + static_cast<int64_t>(u) * TY;
          if (r < t.r_end) fold_vectors<KV, kUnroll>(pol, s[u], raw[u], nvt, 0, k0, step, s_w, r);
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
        const T* p = x + (t.n * g.R + r) * g.K + k0;
        int slot = k_slot<VEC>(0, 0);  // k_slot<VEC>(j, 0) of the lane's vector j
        for (int64_t k = k0; k < t.k_end; k += step, p += step, slot += step) {
          acc_t xv[VEC];
          load_acc<VEC>(p, xv);
          const int ki = static_cast<int>(k);
          for (int v = 0; v < VEC; ++v) {
            pol.add(s, xv[v], staged_weight(s_w, slot + v * TX), ki + v, r);
          }
        }
      } else if (r < t.r_end) {  // the lane's vectors of the row, a group at a time
        fold_row_groups<KV, kUnroll, VEC>(x + (t.n * g.R + r) * g.K + k0, pol, s, nvt, k0, step,
                                          s_w, r);
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
