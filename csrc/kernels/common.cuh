// Shared pieces of the CBAM kernels: the tiling every kernel uses, vector loads, the max/argmax
// combine rule.
//
// Every kernel sees x as [N, R, K] with K the contiguous axis (channels-first: R = C, K = S;
// channels-last: R = S, K = C). A block of TX x TY = 256 threads (TX a power of two <= 32,
// threadIdx.x along k; reduce_r may take TX = K / VEC of a short row instead, TY = 256 / TX)
// owns one tile: sample n, rows [r0, r0 + rows_per_tile), columns
// [c0, c0 + cols_per_tile), cols_per_tile = TX * VEC (reduce_k: a multiple of it). Each thread
// owns VEC adjacent columns (one 16-byte vector when VEC > 1;
// VEC > 1 only when K % VEC == 0 and the base pointers are 16-byte aligned) and walks the tile's
// rows with stride TY. blockIdx.x enumerates (n, row tile, column tile), column tile fastest, so
// no grid dimension other than x is used and any N, C, S fits the hardware limits; or, where the
// launcher reverses the pass (Geom::reverse), the same tiles from the last: block b takes tile
// gridDim.x - 1 - b (tile_block). Blocks start roughly in order of blockIdx, so a reversed pass
// reads x from its end first: the launcher reverses a pass where that end is what the pass
// before it touched last, still in L2 when x is not much larger than it
// (launchers/common.h next_pass_reversed).
// Element offsets are 64-bit ((n * R + r) * K, once per row); in-row offsets are 32-bit
// (the launchers check R, K < 2^31).
#pragma once

#include <type_traits>

#include "dialect/dialect.cuh"

namespace cbam {

constexpr int kBlockThreads = 256;  // TX * TY (at most: a row's own TX, below, may leave a rest)
// reduce_r's tiles of short rows: each of a row's K / VEC vectors its own lane, TX = K / VEC up
// to this many (launchers/common.h make_geom)
constexpr int kMaxSpanCols = 128;
constexpr int kChunkRows = 256;     // rows whose small side values are staged in shared memory

// Rows a thread loads before it uses them (U, independent loads in flight; a template parameter
// of the row-walking kernels): the scalar path moves 4 bytes or less per load, so it takes
// kScalarRowsPerStep rows at a time; 16-byte vectors take 1 or 2 (the launchers' choice,
// launchers/common.h with_rows_in_flight). The rows are still folded in increasing order, so U
// changes no result.
constexpr int kScalarRowsPerStep = 4;

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// Geometry of one launch (see the top comment).
struct Geom {
  int64_t N, R, K;
  int64_t nrt;            // row tiles
  int64_t nkt;            // column tiles
  int64_t rows_per_tile;  // rows in each row tile (the last one may hold fewer)
  int64_t cols_per_tile;  // columns in each column tile: TX * VEC * (vectors per lane and row)
  int* counters;          // a split reduction's group counters (combine_partials.cuh), else null
  int reverse;            // 1: the tiles in reverse order of blockIdx (tile_block)
};

// The tile index of this block: blockIdx.x, or counted from the last where the pass is reversed.
CBAM_DEVICE unsigned tile_block(int reverse) {
  return reverse != 0 ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
}

// Rows folded into one: the vector path of the x-sized kernels (apply_gates, grad_input) for rows
// of K0 elements, K0 not a multiple of VEC. x [N, R0, K0] is viewed as [N, R0 / G, G K0] with
// G = VEC / gcd(K0, VEC) (R0 % G == 0; launchers/apply_gates.cu), so that a folded row is a whole
// number of 16-byte vectors and every row starts aligned (a 7x7 channels-first map of float32:
// 4 rows of 49 elements, 49 vectors). Column k of folded row r is element k % K0 of the original
// row r G + k / K0. G == 1 is the unfolded view. K0 >= VEC: a thread's VEC columns lie in at most
// two original rows.
struct Fold {
  int G;    // original rows per folded row
  int K0;   // original row length
};

// The tile of this block.
struct TileId {
  int64_t n, rt, kt;
  int64_t r_begin, r_end;  // rows [r_begin, r_end)
  int64_t k_begin, k_end;  // columns [k_begin, k_end)
  int64_t k0;              // first column of this thread
};

CBAM_DEVICE TileId tile_id(const Geom& g, int vec) {
  TileId t;
  int64_t b = tile_block(g.reverse);
  t.kt = b % g.nkt;
  b /= g.nkt;
  t.rt = b % g.nrt;
  t.n = b / g.nrt;
  t.r_begin = t.rt * g.rows_per_tile;
  const int64_t e = t.r_begin + g.rows_per_tile;
  t.r_end = e < g.R ? e : g.R;
  t.k_begin = t.kt * g.cols_per_tile;
  const int64_t ke = t.k_begin + g.cols_per_tile;
  t.k_end = ke < g.K ? ke : g.K;
  t.k0 = t.k_begin + static_cast<int64_t>(threadIdx.x) * vec;
  return t;
}

// Where the small value of one column of a tile sits in shared memory (stage_k_side): element v of
// this lane's vector j (column (j * TX + lane) * VEC + v of the tile) at (j * VEC + v) * TX +
// lane. Lane-fastest, so the TX lanes of a row reading the same (j, v) read TX adjacent entries,
// free of bank conflicts (in column order they would read entries VEC apart: up to 32-way
// conflicts with 16-bit x and 16-byte values). kLaneFastest = false keeps column order, for a
// kernel that reads its values once per tile: its addresses are one base and constant offsets,
// which costs fewer registers.
template <int VEC, bool kLaneFastest = true>
CBAM_DEVICE int k_slot(int j, int v) {
  const int TX = static_cast<int>(blockDim.x), lane = static_cast<int>(threadIdx.x);
  return kLaneFastest ? (j * VEC + v) * TX + lane : (j * TX + lane) * VEC + v;
}

// Where a thread's state (or sum) of its column v sits in a block's shared array of
// nthreads * VEC entries, for the trees that combine a column over its TY threads (reduce_r.cuh,
// backward_reduce.cuh): v-major, entry v * nthreads + tid (tid = ty TX + tx), so that the 32
// threads of a warp that read or write their state v touch 32 adjacent entries (a 12-byte pool
// state: 3 words apart, each bank once; a 4-byte sum: one word apart). At tid * VEC + v the lanes
// were VEC entries apart: 16-bit x's 8 pool states, a 96-byte lane stride, put 8 lanes on each
// bank they used, so every step of the tree took up to 8 times the shared-memory wavefronts it
// needs (a fixed cost a block, which no grid setting helped: fewer blocks were faster).
// kVMajor = false keeps tid * VEC + v, for reduce_r's folded rows: with the v-major slots ptxas
// gave their 16-bit U = 4 instance one row of loads in flight fewer (2 of 4, was 3), under its
// 80 registers, and their long walks over the rows weigh more than the tree.
template <int VEC, bool kVMajor = true>
CBAM_DEVICE int tree_slot(int tid, int v) {
  return kVMajor ? v * static_cast<int>(blockDim.x * blockDim.y) + tid : tid * VEC + v;
}
// The slot of column `col` of thread row 0 (col = tx VEC + v: the tile's columns in order).
template <int VEC, bool kVMajor = true>
CBAM_DEVICE int tree_slot_of_column(int col) {
  return kVMajor ? (col % VEC) * static_cast<int>(blockDim.x * blockDim.y) + col / VEC : col;
}

// The small values along k of this tile's columns (a gate, a weight: one per column), staged in
// shared memory `smem` (at least g.cols_per_tile entries, at k_slot) so that global memory sees
// each of them once per tile. load(k) reads column k. Every thread of the block must call it (it
// holds a barrier).
template <int VEC, bool kLaneFastest = true, typename V, typename Load>
CBAM_DEVICE void stage_k_side(V* smem, const TileId& t, Load load) {
  const int TX = static_cast<int>(blockDim.x);
  const int nthreads = TX * static_cast<int>(blockDim.y);
  const int tid = threadIdx.y * TX + threadIdx.x;
  const int ncols = static_cast<int>(t.k_end - t.k_begin);
  for (int c = tid; c < ncols; c += nthreads) {
    const int lane_vec = c / VEC;  // j * TX + lane
    const int slot = kLaneFastest ? ((lane_vec / TX) * VEC + c % VEC) * TX + lane_vec % TX : c;
    smem[slot] = load(t.k_begin + c);
  }
  __syncthreads();
}

// stage_k_side, then each thread copies the values of its VEC columns into `out` (tiles of one
// vector per lane: cols_per_tile == TX * VEC).
template <int VEC, typename V, typename Load>
CBAM_DEVICE void stage_k_side(V* smem, const TileId& t, Load load, V (&out)[VEC]) {
  stage_k_side<VEC>(smem, t, load);
  for (int v = 0; v < VEC; ++v) out[v] = smem[k_slot<VEC>(0, v)];  // unused where k >= K
}

// Whether a reduction policy (pool_policies.cuh) stages weights: not where its Weight is empty
// (the unscaled pools, v = x). Such a kernel stages nothing, loads nothing and multiplies by
// nothing per element; its weight array is one entry, never written.
template <typename Policy>
constexpr bool stages_weights() {
  return !std::is_empty_v<typename Policy::Weight>;
}

// The staged weight of slot i: s_w[i], or the array's one entry for an empty Weight (nothing
// read; the slot's index is then dead code). A reference into the array: one to a local
// Weight{} is refused by nvcc (#836), and a copy made ptxas spill the 16-bit folded lp / lse
// reduce_r_rows (8 bytes, tests/test_codegen.py).
template <typename Weight>
CBAM_DEVICE const Weight& staged_weight(const Weight* s_w, int i) {
  if constexpr (std::is_empty_v<Weight>) {
    return s_w[0];
  } else {
    return s_w[i];
  }
}

// Where folded column kf is in the original view (Fold): row j within the folded row, column k.
// A thread walks its VEC columns with fold_next (two registers, not 2 VEC: the 16-bit grad_input
// spilled with per-column arrays).
struct FoldPos {
  int j;
  int k;
};
CBAM_DEVICE FoldPos fold_pos(int kf, int K0) {
  FoldPos p;
  p.j = kf / K0;
  p.k = kf - p.j * K0;
  return p;
}
CBAM_DEVICE void fold_next(FoldPos& p, int K0) {
  const bool wrap = p.k + 1 == K0;
  p.k = wrap ? 0 : p.k + 1;
  p.j += wrap ? 1 : 0;
}

// stage_k_side for rows folded G at a time (Fold): the tile's columns [k_begin, k_end) hold the
// original columns (k_begin + e) % K0, e < min(K0, k_end - k_begin) (a tile that spans the
// folded row: all K0 of them, not G K0 copies), each loaded once with load(original column) into
// smem[padded_slot<VEC>(e)]: column order with one empty slot after every VEC, so that the lanes
// of a warp, VEC columns apart, read distinct banks when they read their column v (unpadded:
// up to 32-way conflicts for 16-byte values). smem holds kFoldedSlots<VEC> entries. Original
// column k of the tile sits at folded_slot<VEC>(k, ...). Every thread of the block must call it
// (it holds a barrier).
template <int VEC>
CBAM_DEVICE int padded_slot(int e) {
  return e + e / VEC;
}
template <int VEC>
constexpr int kFoldedSlots = kMaxSpanCols * (VEC + 1);

template <int VEC, typename V, typename Load>
CBAM_DEVICE void stage_k_side_folded(V* smem, const TileId& t, int K0, Load load) {
  const int nthreads = static_cast<int>(blockDim.x * blockDim.y);
  const int tid = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  const int64_t ncols = t.k_end - t.k_begin;
  const int nu = static_cast<int>(ncols < K0 ? ncols : K0);
  const int o0 = static_cast<int>(t.k_begin % K0);
  for (int e = tid; e < nu; e += nthreads) {
    const int k = o0 + e;
    smem[padded_slot<VEC>(e)] = load(k < K0 ? k : k - K0);
  }
  __syncthreads();
}

// Where stage_k_side_folded put original column k (a column of the tile).
template <int VEC>
CBAM_DEVICE int folded_slot(int k, const TileId& t, int K0) {
  const int e = k - static_cast<int>(t.k_begin % K0);
  return padded_slot<VEC>(e < 0 ? e + K0 : e);
}

// Loads VEC elements of T at p (16-byte aligned when VEC > 1) as they are in memory: a kernel
// that holds several loads in flight keeps them in this form (a 16-bit vector in 4 registers, not
// the 8 of its acc_t values) and converts each with to_acc when it uses it.
// Rows in flight (the kernels' U): a trip issues its loads raw, unguarded where all its rows are
// in range, and converts them only after all are issued; the partial trip keeps its guards, so
// no byte is read twice. A load converted inside its guard is waited for before the next is
// issued (one in flight for any U), and nested guards let ptxas sink loads to their use;
// tests/test_codegen.py reads the SASS for it.
template <int VEC, typename T>
CBAM_DEVICE Vec<T, VEC> load_raw(const T* p) {
  if constexpr (VEC == 1) {
    Vec<T, 1> v;
    v.val[0] = ld(p);
    return v;
  } else {
    return ld_vec<VEC>(p);
  }
}

template <int VEC, typename T, typename acc_t>
CBAM_DEVICE void to_acc(const Vec<T, VEC>& v, acc_t (&out)[VEC]) {
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(v.val[i]);
}

// Loads VEC elements of T at p (16-byte aligned when VEC > 1) as acc_t.
template <int VEC, typename T, typename acc_t>
CBAM_DEVICE void load_acc(const T* p, acc_t (&out)[VEC]) {
  to_acc<VEC>(load_raw<VEC>(p), out);
}

// The VEC elements of T at x + a, a a multiple of VEC (x 16-byte aligned), as acc_t: one 16-byte
// load, or where the window reaches `end` (x's size), one element a load and zeros past it.
template <int VEC, typename T, typename acc_t>
CBAM_DEVICE void load_window(const T* x, int64_t a, int64_t end, acc_t (&out)[VEC]) {
  if (a + VEC <= end) {
    load_acc<VEC>(x + a, out);
  } else {
    for (int v = 0; v < VEC; ++v) {
      out[v] = a + v < end ? static_cast<acc_t>(ld(x + a + v)) : acc_t(0);
    }
  }
}

// Rows that are not whole vectors (K % VEC != 0, not folded): for each of U rows (has[u]), the
// VEC elements of T at x + e[u] as acc_t, e[u] = the row's start + this lane's first column,
// m = e[u] % VEC elements past a 16-byte boundary (the same for every lane of the row). The TX
// lanes of a row (threadIdx.x: consecutive lanes of one warp, TX a power of two) each load the
// window at e - m (load_window) and take the next one, which holds their last m elements, from
// the next lane by a shuffle; the row's last lane loads it. Then [window | next] shifts down by
// m in log2(VEC) fixed steps of selects (no indexing of registers: nothing goes to local
// memory). So a row moves in 16-byte loads, about once (1 + 1 / TX). Every lane of the warp
// calls it (the shuffles), lanes past the row's end too: their windows are the next lane's.
template <int U, int VEC, typename T, typename acc_t>
CBAM_DEVICE void load_rows_shifted(const T* x, const int64_t (&e)[U], const bool (&has)[U],
                                   int64_t end, acc_t (&out)[U][VEC]) {
  const bool last = threadIdx.x + 1 == blockDim.x;
  CBAM_UNROLL
  for (int u = 0; u < U; ++u) {
    const int m = has[u] ? static_cast<int>(e[u] % VEC) : 0;
    const int64_t a = e[u] - m;
    if (has[u]) {
      load_window<VEC>(x, a, end, out[u]);
    } else {
      for (int v = 0; v < VEC; ++v) out[u][v] = acc_t(0);
    }
    acc_t hi[VEC];
    for (int v = 0; v < VEC; ++v) hi[v] = __shfl_down_sync(0xffffffffu, out[u][v], 1);
    if (last && has[u] && m != 0) load_window<VEC>(x, a + VEC, end, hi);
    CBAM_UNROLL
    for (int b = 1; b < VEC; b *= 2) {  // [out | hi] shifted down by b where m has bit b
      const bool take = (m & b) != 0;
      CBAM_UNROLL
      for (int v = 0; v < VEC; ++v) {
        out[u][v] = take ? (v + b < VEC ? out[u][v + b] : hi[v + b - VEC]) : out[u][v];
      }
      CBAM_UNROLL
      for (int v = 0; v < VEC; ++v) hi[v] = take ? (v + b < VEC ? hi[v + b] : acc_t(0)) : hi[v];
    }
  }
}

// The U rows of a step through a chunk of a tile's rows (rows ib + u TY + ty of the chunk at
// row cb, of clen rows) as load_rows_shifted takes them: has[u] whether the row is in the
// chunk, e[u] the offset of this lane's first column in it.
template <int U>
CBAM_DEVICE void shifted_step_rows(const TileId& t, const Geom& g, int64_t cb, int clen, int ib,
                                   int64_t (&e)[U], bool (&has)[U]) {
  CBAM_UNROLL
  for (int u = 0; u < U; ++u) {
    const int i = ib + u * static_cast<int>(blockDim.y) + static_cast<int>(threadIdx.y);
    has[u] = i < clen;
    e[u] = (t.n * g.R + cb + i) * g.K + t.k0;
  }
}

// Stores VEC values as T at p (16-byte aligned when VEC > 1).
template <int VEC, typename T, typename acc_t>
CBAM_DEVICE void store_from_acc(T* p, const acc_t (&in)[VEC]) {
  if constexpr (VEC == 1) {
    st(p, static_cast<T>(in[0]));
  } else {
    Vec<T, VEC> v;
    for (int i = 0; i < VEC; ++i) v.val[i] = static_cast<T>(in[i]);
    st_vec<VEC>(p, v);
  }
}

constexpr int kNoIndex = 0x7fffffff;  // the index of an empty max state

// Folds (m2, i2) into the running max (m, i) as torch.max does: the larger value wins, a NaN
// beats every number, ties (and two NaNs) go to the smaller index. The rule is commutative and
// associative, so the result does not depend on the order in which partial results meet.
// Branch-free (bitwise on the conditions, then selects: nvcc turned the nested ifs into ~3
// branches per element): every comparison with a NaN is false, so the last two terms only
// decide between numbers.
template <typename acc_t>
CBAM_DEVICE void max_combine(acc_t& m, int& i, acc_t m2, int i2) {
  const bool nan1 = isnan(m), nan2 = isnan(m2), lt = i2 < i;
  const bool take = (nan2 & (!nan1 | lt)) | (m2 > m) | ((m2 == m) & lt);
  m = take ? m2 : m;
  i = take ? i2 : i;
}

// max_combine of one new element (v, iv) whose index is larger than every index folded into
// (m, i) so far (a thread folds its elements in increasing index order): then a tie or a second
// NaN never takes. Two comparisons and two selects an element: !(v <= m) is v > m or a NaN v,
// and m == m leaves a NaN max for good. An element equal to an empty state's max (-inf) does not
// take either, so a state's index stays kNoIndex for as long as its max is -inf: max_index gives
// 0 for it at the store, the first index of a row of -inf (and no other row ends there).
template <typename acc_t>
CBAM_DEVICE void max_fold_next(acc_t& m, int& i, acc_t v, int iv) {
  const bool take = !(v <= m) & (m == m);
  m = take ? v : m;
  i = take ? iv : i;
}

// The argmax of a folded state: its index, or 0 for kNoIndex (every element -inf, max_fold_next).
CBAM_DEVICE int64_t max_index(int i) { return i == kNoIndex ? 0 : static_cast<int64_t>(i); }

}  // namespace cbam
