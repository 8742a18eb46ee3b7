// The CPU kernel of the forward pools (pool_over_s, pool_over_c), one pass over x. For x viewed
// as [N, C, S] (any strides) and the reduced axis dim (2: over S, 1: over C), with
// v = x * scale[n, r] (r the reduced index; without scale v = x):
//   mean[n, k] = sum_r v / R,  max[n, k] = max_r v,  argmax[n, k] = its first r (a NaN wins)
// in the accumulation dtype (double for float64, float otherwise), outputs [N, K] contiguous.
// ATen's max with indices over a strided axis walks it element by element for each output (4 ms
// over C channels-first, 20 ms over S channels-last at 8x256x56x56 float32, where a pass over x
// takes about 1 ms here), and x * scale was a tensor of its own.
//
// Loops: where the kept axis is the more contiguous one, a task keeps a block of outputs running
// and folds one row of the reduced axis into them at a time (fold_row); where the reduced axis
// is, an output's values are folded into kLanes running lanes (fold_lanes), then the lanes are
// combined (the greatest, on a tie the lower index, a NaN first). Both fold loops are branch-free
// so that the compiler vectorizes them, compiled for AVX-512, AVX2 and the baseline on x86-64
// (target_clones, chosen at load time). Sums: float (double for float64) over chunks of rows,
// then added in double.
//
// Called by cbam_fused/_cpu_fast.py as torch.ops.cbam_fused_cpu.pool_rows; the ops' CPU kernels
// stay in Python so that the simulator can take their calls in tests.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CBAM_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CBAM_CPU_CLONES
#endif

namespace cbam {
namespace {

constexpr int64_t kBlock = 256;  // outputs a task keeps running along the kept axis
constexpr int64_t kChunk = 64;   // rows summed in T before the sum goes to double
constexpr int64_t kLanes = 16;   // running lanes along a contiguous reduced axis

// torch.max's rule, branch-free: greater, or the first NaN (a NaN is never replaced)
template <typename T>
inline bool takes_over(T v, T m) {
  return (v > m) | ((v != v) & (m == m));
}

// Folds the row v[j] = row[j] * s (reduced index r) into len running outputs.
template <typename T>
__attribute__((always_inline)) inline void fold_row_body(const T* __restrict row, T s, int32_t r,
                                                         int64_t len, T* __restrict psum,
                                                         T* __restrict m, int32_t* __restrict a) {
  for (int64_t j = 0; j < len; ++j) {
    const T v = row[j] * s;
    psum[j] += v;
    const bool take = takes_over(v, m[j]);
    m[j] = take ? v : m[j];
    a[j] = take ? r : a[j];
  }
}

// Folds kLanes values v[l] = vals[l] (reduced indices r0 + l) into the lanes.
template <typename T>
__attribute__((always_inline)) inline void fold_lanes_body(const T* __restrict vals, int32_t r0,
                                                           T* __restrict psum, T* __restrict m,
                                                           int32_t* __restrict a) {
  for (int32_t l = 0; l < kLanes; ++l) {
    const T v = vals[l];
    psum[l] += v;
    const bool take = takes_over(v, m[l]);
    m[l] = take ? v : m[l];
    a[l] = take ? r0 + l : a[l];
  }
}

// The multiversioned entry points: plain overloads (compilers clone those more reliably than
// templates), each inlining the body compiled for its instruction set.
#define CBAM_FOLD_ENTRIES(T)                                                                 \
  CBAM_CPU_CLONES void fold_row(const T* __restrict row, T s, int32_t r, int64_t len,         \
                                T* __restrict psum, T* __restrict m, int32_t* __restrict a) { \
    fold_row_body(row, s, r, len, psum, m, a);                                                 \
  }                                                                                            \
  CBAM_CPU_CLONES void fold_lanes(const T* __restrict vals, int32_t r0, T* __restrict psum,    \
                                  T* __restrict m, int32_t* __restrict a) {                    \
    fold_lanes_body(vals, r0, psum, m, a);                                                     \
  }
CBAM_FOLD_ENTRIES(float)
CBAM_FOLD_ENTRIES(double)
#undef CBAM_FOLD_ENTRIES

template <typename scalar_t, typename T>
struct Pool {
  const scalar_t* xp;
  const T* scale;  // [N, R] or nullptr
  int64_t n, keep, red, sn, sk, sr;
  T* mean;
  T* mx;
  int64_t* arg;

  T scale_at(int64_t b, int64_t r) const { return scale ? scale[b * red + r] : T(1); }

  // a block of outputs [k0, k0 + len) of sample b, the kept axis the more contiguous one
  void along_kept(int64_t b, int64_t k0, int64_t len) const {
    T buf[kBlock], psum[kBlock], m[kBlock];
    double sum[kBlock];
    int32_t a[kBlock];
    const scalar_t* base = xp + b * sn + k0 * sk;
    for (int64_t j = 0; j < len; ++j) {
      m[j] = static_cast<T>(base[j * sk]) * scale_at(b, 0);
      a[j] = 0;
      sum[j] = 0;
    }
    for (int64_t r0 = 0; r0 < red; r0 += kChunk) {
      std::fill(psum, psum + len, T(0));
      for (int64_t r = r0; r < std::min(red, r0 + kChunk); ++r) {
        const scalar_t* row = base + r * sr;
        const T* vals = buf;
        if constexpr (std::is_same_v<scalar_t, T>) {
          if (sk == 1) vals = row;
        }
        if (vals == buf) {
          for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<T>(row[j * sk]);
        }
        fold_row(vals, scale_at(b, r), static_cast<int32_t>(r), len, psum, m, a);
      }
      for (int64_t j = 0; j < len; ++j) sum[j] += psum[j];
    }
    const double inv = 1.0 / static_cast<double>(red);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t o = b * keep + k0 + j;
      mean[o] = static_cast<T>(sum[j] * inv);
      mx[o] = m[j];
      arg[o] = a[j];
    }
  }

  // output o = (b, k), the reduced axis the more contiguous one
  void along_reduced(int64_t b, int64_t k) const {
    T buf[kBlock], psum[kLanes], m[kLanes];
    int32_t a[kLanes];
    const scalar_t* row = xp + b * sn + k * sk;
    const int64_t lanes = std::min(kLanes, red);
    for (int64_t l = 0; l < kLanes; ++l) {  // lanes past R start as -inf at index R (never win)
      m[l] = l < lanes ? static_cast<T>(row[l * sr]) * scale_at(b, l)
                       : -std::numeric_limits<T>::infinity();
      a[l] = static_cast<int32_t>(l < lanes ? l : red);
    }
    double total = 0;
    for (int64_t r0 = 0; r0 < red; r0 += kBlock) {
      const int64_t len = std::min(kBlock, red - r0);
      const T* vals = buf;  // the chunk's values: x itself where it is contiguous T, unscaled
      const T* sc = scale ? scale + b * red + r0 : nullptr;
      if constexpr (std::is_same_v<scalar_t, T>) {
        if (sr == 1 && !sc) vals = row + r0;
      }
      if (vals == buf && sr == 1) {  // split so that each loop vectorizes
        if (sc) {
          for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<T>(row[r0 + j]) * sc[j];
        } else {
          for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<T>(row[r0 + j]);
        }
      } else if (vals == buf) {
        for (int64_t j = 0; j < len; ++j) {
          buf[j] = static_cast<T>(row[(r0 + j) * sr]) * (sc ? sc[j] : T(1));
        }
      }
      const int64_t full = len - len % kLanes;
      std::fill(psum, psum + kLanes, T(0));
      for (int64_t j = 0; j < full; j += kLanes) {
        fold_lanes(vals + j, static_cast<int32_t>(r0 + j), psum, m, a);
      }
      for (int64_t j = full; j < len; ++j) {  // the tail, one lane each
        const int64_t l = j - full;
        const T v = vals[j];
        psum[l] += v;
        if (takes_over(v, m[l])) {
          m[l] = v;
          a[l] = static_cast<int32_t>(r0 + j);
        }
      }
      for (int64_t l = 0; l < kLanes; ++l) total += psum[l];
    }
    T best = m[0];
    int32_t at = a[0];
    for (int64_t l = 1; l < kLanes; ++l) {
      const bool nan_l = m[l] != m[l], nan_b = best != best;
      const bool take = nan_l ? (!nan_b || a[l] < at)
                              : (!nan_b && (m[l] > best || (m[l] == best && a[l] < at)));
      if (take) {
        best = m[l];
        at = a[l];
      }
    }
    const int64_t o = b * keep + k;
    mean[o] = static_cast<T>(total / static_cast<double>(red));
    mx[o] = best;
    arg[o] = at;
  }

  void run() const {
    if (sk <= sr && !(sr == 1 && sk != 1)) {
      const int64_t blocks = (keep + kBlock - 1) / kBlock;
      at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t k0 = (t % blocks) * kBlock;
          along_kept(t / blocks, k0, std::min(kBlock, keep - k0));
        }
      });
    } else {
      at::parallel_for(0, n * keep, std::max<int64_t>(1, 4096 / red),
                       [&](int64_t begin, int64_t end) {
        for (int64_t o = begin; o < end; ++o) along_reduced(o / keep, o % keep);
      });
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_rows(const at::Tensor& x,
                                                         const std::optional<at::Tensor>& scale,
                                                         int64_t dim) {
  TORCH_CHECK(x.device().is_cpu(), "pool_rows: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "pool_rows: x must have shape [N, C, S], got ", x.sizes());
  TORCH_CHECK(dim == 1 || dim == 2, "pool_rows: dim must be 1 or 2, got ", dim);
  const int64_t n = x.size(0), keep = x.size(3 - dim), red = x.size(dim);
  TORCH_CHECK(red > 0, "pool_rows: cannot take the max over an empty dimension");
  TORCH_CHECK(red < INT32_MAX, "pool_rows: at most 2^31 - 2 reduced elements, got ", red);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (scale) {
    TORCH_CHECK(scale->device().is_cpu() && scale->scalar_type() == acc &&
                    scale->is_contiguous() && scale->dim() == 2 && scale->size(0) == n &&
                    scale->size(1) == red,
                "pool_rows: scale must be a contiguous CPU tensor of shape [", n, ", ", red,
                "] in the accumulation dtype, got ", scale->sizes(), " ", scale->scalar_type());
  }
  auto opts = x.options().dtype(acc);
  at::Tensor mean = at::empty({n, keep}, opts), mx = at::empty({n, keep}, opts);
  at::Tensor arg = at::empty({n, keep}, x.options().dtype(at::kLong));
  if (mean.numel() == 0) {
    return {mean, mx, arg};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_rows", [&] {
    using T = at::opmath_type<scalar_t>;
    Pool<scalar_t, T>{x.const_data_ptr<scalar_t>(), scale ? scale->const_data_ptr<T>() : nullptr,
                      n, keep, red, x.stride(0), x.stride(3 - dim), x.stride(dim),
                      mean.mutable_data_ptr<T>(), mx.mutable_data_ptr<T>(),
                      arg.mutable_data_ptr<int64_t>()}
        .run();
  });
  return {mean, mx, arg};
}

}  // namespace
}  // namespace cbam

TORCH_LIBRARY(cbam_fused_cpu, m) {
  m.def("pool_rows(Tensor x, Tensor? scale, int dim) -> (Tensor mean, Tensor max, Tensor argmax)",
        &cbam::pool_rows);
}
