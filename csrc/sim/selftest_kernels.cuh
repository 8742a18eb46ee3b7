// Small kernels, written in the kernel dialect, that test the SIMT simulator (tests/
// test_simulator.py) and prove that the dialect compiles under nvcc (csrc/launchers/selftest.cu).
// No #ifdef: the same source builds both ways. Launchers take and return CPU tensors in the
// simulator build (cbam_fused._sim.selftest_*), CUDA tensors in the nvcc build.
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "dialect/dialect.cuh"

namespace cbam {
namespace selftest {

CBAM_DEVICE unsigned linear_tid() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
CBAM_DEVICE unsigned linear_bid() { return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z); }
CBAM_DEVICE unsigned threads_per_block() { return blockDim.x * blockDim.y * blockDim.z; }

// ------------------------------------------------------------------ shared-memory block reduction
// out[b] = sum of x[b * blockDim.x + t]; blockDim.x is a power of two of at most 1024.
template <typename T>
CBAM_GLOBAL void block_reduce_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ T buf[1024];
  const unsigned t = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + t;
  buf[t] = i < n ? ld(x + i) : T(0);
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) st(out + blockIdx.x, buf[0]);
}

// --------------------------------------------------------------------- warp-shuffle reductions
// out[w] = sum of the 32 values of warp w (shfl_down tree, lane 0 writes); all[i] = the same sum
// computed by every lane with an xor butterfly.
template <typename T>
CBAM_GLOBAL void warp_reduce_kernel(const T* __restrict__ x, T* __restrict__ out,
                                    T* __restrict__ all) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const T v = ld(x + i);
  T a = v;
  for (int d = 16; d > 0; d /= 2) a += __shfl_down_sync(0xffffffffu, a, d);
  if ((i & 31u) == 0) st(out + i / 32, a);
  T b = v;
  for (int m = 1; m < 32; m *= 2) b += __shfl_xor_sync(0xffffffffu, b, m);
  st(all + i, b);
}

// -------------------------------------------------------------------------------- shuffles
// out[g] = the shuffle `mode` (0 idx, 1 up, 2 down, 3 xor) of x[g] with (arg, width), for every
// thread g of the grid (linear ids). Threads with linear id in the block >= n_live exit first.
template <typename T>
CBAM_GLOBAL void shuffle_kernel(const T* __restrict__ x, T* __restrict__ out, int mode, int arg,
                                int width, int n_live) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  const unsigned t = linear_tid();
  if (static_cast<int>(t) >= n_live) return;
  const int64_t g = static_cast<int64_t>(linear_bid()) * threads_per_block() + t;
  const T v = ld(x + g);
  T r = v;
  if (mode == 0) {
    r = __shfl_sync(0xffffffffu, v, arg, width);
  } else if (mode == 1) {
    r = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
  } else if (mode == 2) {
    r = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
  } else {
    r = __shfl_xor_sync(0xffffffffu, v, arg, width);
  }
  st(out + g, r);
}

// ---------------------------------------------------------------------------- ballot/any/all
// For pred = (x[g] != 0): ballot[g], any[g], all[g] over the thread's warp.
CBAM_GLOBAL void vote_kernel(const int32_t* __restrict__ x, int64_t* __restrict__ ballot,
                             int32_t* __restrict__ any, int32_t* __restrict__ all, int n_live) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  const unsigned t = linear_tid();
  if (static_cast<int>(t) >= n_live) return;
  const int64_t g = static_cast<int64_t>(linear_bid()) * threads_per_block() + t;
  const int pred = ld(x + g) != 0;
  const unsigned b = __ballot_sync(0xffffffffu, pred);
  const int an = __any_sync(0xffffffffu, pred);
  const int al = __all_sync(0xffffffffu, pred);
  __syncwarp();
  st(ballot + g, static_cast<int64_t>(b));
  st(any + g, static_cast<int32_t>(an));
  st(all + g, static_cast<int32_t>(al));
}

// ------------------------------------------------------------------------------------- races
// out[t] = x[(t + 1) % n] through shared memory; with sync == 0 the __syncthreads between the
// write and the read is missing (a race: the result depends on the thread order).
CBAM_GLOBAL void neighbour_kernel(const float* __restrict__ x, float* __restrict__ out, int sync) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ float buf[1024];
  const unsigned t = threadIdx.x;
  const unsigned n = blockDim.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  buf[t] = ld(x + base + t);
  if (sync) __syncthreads();
  st(out + base + t, buf[(t + 1) % n]);
}

// ------------------------------------------------------------------------- barrier mistakes
// mode 0: odd and even threads wait at different __syncthreads (divergent barrier)
// mode 1: lanes 0-15 of warp 0 wait at a shuffle, the others at __syncthreads (deadlock)
// mode 2: lanes 0-15 and 16-31 of each warp reach a shuffle of the same kind from different
//         call sites (valid on sm_70+): out[t] = x[t ^ 1] for lanes 0-15, x[t ^ 2] for 16-31
// mode 6: lanes 0-15 do a shuffle while lanes 16-31 do a ballot (divergent warp collective)
// mode 3: threads t >= blockDim.x / 2 exit, the others use __syncthreads (valid: exited threads
//         stop counting); out[t] = x[t] + x[t + 1] for t < blockDim.x / 2
// mode 4: a __syncwarp with a partial mask (unsupported by the dialect)
// mode 5: a shuffle with width 3 (invalid)
CBAM_GLOBAL void barrier_kernel(const float* __restrict__ x, float* __restrict__ out, int mode) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ float buf[1024];
  const unsigned t = threadIdx.x;
  float v = ld(x + t);
  if (mode == 0) {
    if (t % 2) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (mode == 1) {
    if (t < 16) {
      v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    __syncthreads();
  } else if (mode == 2) {
    if (t % 32 < 16) {
      v = __shfl_xor_sync(0xffffffffu, v, 1);
    } else {
      v = __shfl_xor_sync(0xffffffffu, v, 2);
    }
  } else if (mode == 3) {
    if (t >= blockDim.x / 2) return;
    buf[t] = v;
    buf[t + blockDim.x / 2] = ld(x + t + blockDim.x / 2);
    __syncthreads();
    v = buf[t] + buf[t + 1];
  } else if (mode == 4) {
    __syncwarp(0x0000ffffu);
  } else if (mode == 5) {
    v = __shfl_xor_sync(0xffffffffu, v, 1, 3);
  } else if (mode == 6) {
    if (t % 32 < 16) {
      v = __shfl_xor_sync(0xffffffffu, v, 1);
    } else {
      v = static_cast<float>(__ballot_sync(0xffffffffu, v > 0.0f));
    }
  }
  st(out + t, v);
}

// ---------------------------------------------------------------------- global-memory checks
// mode 0: vector load of 4 floats at x + offset (misaligned unless offset % 4 == 0)
// mode 1: vector store of 4 floats at out + offset
// mode 2: scalar load of x[offset]; mode 3: scalar store to out[offset]
// mode 4: scalar store to x[offset] (x is handed to the launch as const)
// mode 5: mode 2 before grid_dependency_sync() (refused: every kernel calls it first)
CBAM_GLOBAL void access_kernel(const float* __restrict__ x, float* __restrict__ out, int mode,
                               int64_t offset) {
  if (mode == 5 && threadIdx.x == 0) st(out, ld(x + offset));
  grid_dependency_sync();  // first, before any global access (dialect.cuh), but for mode 5
  if (threadIdx.x != 0) return;
  if (mode == 0) {
    const Vec<float, 4> v = ld_vec<4>(x + offset);
    st(out, v.val[0] + v.val[1] + v.val[2] + v.val[3]);
  } else if (mode == 1) {
    Vec<float, 4> v;
    for (int k = 0; k < 4; ++k) v.val[k] = 1.0f;
    st_vec<4>(out + offset, v);
  } else if (mode == 2) {
    st(out, ld(x + offset));
  } else if (mode == 3) {
    st(out + offset, 1.0f);
  } else if (mode == 4) {
    st(const_cast<float*>(x) + offset, 1.0f);
  }
}

// --------------------------------------------------------------------------------- copy
// out = x with VEC-wide accesses where aligned and a scalar head and tail: every element is read
// once and written once, so a launch moves exactly 2 * numel * sizeof(T) bytes.
template <typename T, int VEC>
CBAM_GLOBAL void copy_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n,
                             int64_t head) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = t0; i < head && i < n; i += stride) st(out + i, ld(x + i));
  const int64_t n_vec = n > head ? (n - head) / VEC : 0;
  for (int64_t j = t0; j < n_vec; j += stride) {
    const int64_t i = head + j * VEC;
    st_vec<VEC>(out + i, ld_vec<VEC>(x + i));
  }
  for (int64_t i = head + n_vec * VEC + t0; i < n; i += stride) st(out + i, ld(x + i));
}

// ---------------------------------------------------------------------------------- reread
// Block b reads its chunk x[b * chunk, (b + 1) * chunk) twice, a barrier between the two passes:
// out[b * threads + t] = 2 * (the sum of the elements t, t + threads, ... of the chunk). For the
// simulator's L2 model (tests/test_simulator.py): alone, a block's second pass finds its chunk in
// an L2 that holds it; with the other blocks interleaved, only in one that holds all of theirs.
CBAM_GLOBAL void reread_kernel(const float* __restrict__ x, float* __restrict__ out,
                              int64_t chunk) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  const unsigned t = linear_tid();
  const int64_t base = static_cast<int64_t>(linear_bid()) * chunk;
  float acc = 0.0f;
  for (int64_t i = t; i < chunk; i += threads_per_block()) acc += ld(x + base + i);
  __syncthreads();
  for (int64_t i = t; i < chunk; i += threads_per_block()) acc += ld(x + base + i);
  st(out + static_cast<int64_t>(linear_bid()) * threads_per_block() + t, acc);
}

// ----------------------------------------------------------------------------- block order
// order[b] = the ticket block b drew (its place among the blocks that finished before it):
// thread 0 of each block takes atomic_ticket(counter) after the block's barrier. The simulator's
// schedules run the blocks in linear, reverse or shuffled order.
CBAM_GLOBAL void block_order_kernel(int* counter, int* order) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    fence_gpu();
    st(order + linear_bid(), atomic_ticket(counter));
  }
}

// ------------------------------------------------------------------------ launch configurations
// out[block linear id * threads + thread linear id] = that index + 1; also round-trips through
// the dynamic shared memory (the first smem_floats floats of it).
CBAM_GLOBAL void config_kernel(int64_t* __restrict__ out, int smem_floats) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  CBAM_DYNAMIC_SMEM(float, dyn);
  const unsigned t = linear_tid();
  const unsigned n = threads_per_block();
  for (int k = static_cast<int>(t); k < smem_floats; k += static_cast<int>(n))
    dyn[k] = static_cast<float>(k);
  __syncthreads();
  int ok = 1;
  for (int k = static_cast<int>(t); k < smem_floats; k += static_cast<int>(n))
    ok &= dyn[k] == static_cast<float>(k);
  const int64_t g = static_cast<int64_t>(linear_bid()) * n + t;
  st(out + g, ok ? g + 1 : int64_t(-1));
}

// The same, for launches that raise the dynamic shared memory limit first.
CBAM_GLOBAL void big_smem_kernel(int64_t* __restrict__ out, int smem_floats) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  CBAM_DYNAMIC_SMEM(float, dyn);
  const unsigned t = threadIdx.x;
  for (int k = static_cast<int>(t); k < smem_floats; k += static_cast<int>(blockDim.x))
    dyn[k] = static_cast<float>(k);
  __syncthreads();
  int ok = 1;
  for (int k = static_cast<int>(t); k < smem_floats; k += static_cast<int>(blockDim.x))
    ok &= dyn[k] == static_cast<float>(k);
  st(out + static_cast<int64_t>(blockIdx.x) * blockDim.x + t, ok ? int64_t(1) : int64_t(-1));
}

// ------------------------------------------------------------------ shared memory between blocks
// Block 0 writes its static and dynamic shared memory; every block then reads both without
// writing: blocks after the first must see poison (NaN), not block 0's values.
CBAM_GLOBAL void smem_leak_kernel(float* __restrict__ out_static, float* __restrict__ out_dynamic) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ float buf[256];
  CBAM_DYNAMIC_SMEM(float, dyn);
  const unsigned t = threadIdx.x;
  if (blockIdx.x == 0) {
    buf[t] = 1.0f;
    dyn[t] = 2.0f;
  }
  __syncthreads();
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + t;
  st(out_static + g, buf[t]);
  st(out_dynamic + g, dyn[t]);
}

// ------------------------------------------------------------------------------------ timing
// iters rounds of: write shared memory, __syncthreads, read a neighbour. out[g] = final value.
CBAM_GLOBAL void barrier_loop_kernel(float* __restrict__ out, int iters) {
  grid_dependency_sync();  // first, before any global access (dialect.cuh)
  __shared__ float buf[1024];
  const unsigned t = threadIdx.x;
  const unsigned n = blockDim.x;
  float v = static_cast<float>(t);
  for (int k = 0; k < iters; ++k) {
    buf[t] = v;
    __syncthreads();
    v = buf[(t + 1) % n] + 1.0f;
    __syncthreads();
  }
  st(out + static_cast<int64_t>(blockIdx.x) * n + t, v);
}

// =================================================================================== launchers
inline at::Tensor block_reduce(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "block_reduce: x must be 1-D contiguous");
  const int64_t n = x.numel();
  const int64_t blocks = (n + block - 1) / block;
  at::Tensor out = at::full({blocks}, NAN, x.options());
  if (x.scalar_type() == at::kDouble) {
    launch("selftest_block_reduce", &block_reduce_kernel<double>, dim3(blocks), dim3(block), 0,
           global_ptr<const double>(x), global_ptr<double>(out), n);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "block_reduce: float32 or float64");
    launch("selftest_block_reduce", &block_reduce_kernel<float>, dim3(blocks), dim3(block), 0,
           global_ptr<const float>(x), global_ptr<float>(out), n);
  }
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> warp_reduce_t(const at::Tensor& x, int64_t block) {
  const int64_t n = x.numel();
  TORCH_CHECK(n % block == 0 && block % 32 == 0, "warp_reduce: sizes");
  at::Tensor out = at::empty({n / 32}, x.options());
  at::Tensor all = at::empty({n}, x.options());
  launch("selftest_warp_reduce", &warp_reduce_kernel<T>, dim3(n / block), dim3(block), 0,
         global_ptr<const T>(x), global_ptr<T>(out), global_ptr<T>(all));
  return {out, all};
}

inline std::tuple<at::Tensor, at::Tensor> warp_reduce(const at::Tensor& x, int64_t block) {
  switch (x.scalar_type()) {
    case at::kFloat: return warp_reduce_t<float>(x, block);
    case at::kDouble: return warp_reduce_t<double>(x, block);
    case at::kInt: return warp_reduce_t<int32_t>(x, block);
    case at::kLong: return warp_reduce_t<int64_t>(x, block);
    default: TORCH_CHECK(false, "warp_reduce: unsupported dtype ", x.scalar_type());
  }
}

template <typename T>
void shuffle_t(const at::Tensor& x, const at::Tensor& out, int64_t mode, int64_t arg,
               int64_t width, dim3 grid, dim3 block, int64_t n_live) {
  launch("selftest_shuffle", &shuffle_kernel<T>, grid, block, 0, global_ptr<const T>(x),
         global_ptr<T>(out), mode, arg, width, n_live);
}

// x holds grid * block elements (linear ids); out is x's shape, NaN/-1 where a thread exited.
inline at::Tensor shuffle(const at::Tensor& x, int64_t mode, int64_t arg, int64_t width,
                          std::vector<int64_t> grid, std::vector<int64_t> block, int64_t n_live) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "shuffle: grid and block are 3 sizes");
  const dim3 g(grid[0], grid[1], grid[2]), b(block[0], block[1], block[2]);
  at::Tensor out = x.is_floating_point() ? at::full_like(x, NAN) : at::full_like(x, -1);
  switch (x.scalar_type()) {
    case at::kFloat: shuffle_t<float>(x, out, mode, arg, width, g, b, n_live); break;
    case at::kDouble: shuffle_t<double>(x, out, mode, arg, width, g, b, n_live); break;
    case at::kInt: shuffle_t<int32_t>(x, out, mode, arg, width, g, b, n_live); break;
    case at::kLong: shuffle_t<int64_t>(x, out, mode, arg, width, g, b, n_live); break;
    case at::kHalf: shuffle_t<c10::Half>(x, out, mode, arg, width, g, b, n_live); break;
    case at::kBFloat16: shuffle_t<c10::BFloat16>(x, out, mode, arg, width, g, b, n_live); break;
    default: TORCH_CHECK(false, "shuffle: unsupported dtype ", x.scalar_type());
  }
  return out;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> vote(const at::Tensor& x,
                                                           int64_t block, int64_t n_live) {
  TORCH_CHECK(x.scalar_type() == at::kInt && x.numel() % block == 0, "vote: int32 x");
  at::Tensor ballot = at::full(x.sizes(), -1, x.options().dtype(at::kLong));
  at::Tensor any = at::full_like(x, -1);
  at::Tensor all = at::full_like(x, -1);
  launch("selftest_vote", &vote_kernel, dim3(x.numel() / block), dim3(block), 0,
         global_ptr<const int32_t>(x), global_ptr<int64_t>(ballot), global_ptr<int32_t>(any),
         global_ptr<int32_t>(all), n_live);
  return {ballot, any, all};
}

inline at::Tensor neighbour(const at::Tensor& x, int64_t block, bool sync) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() % block == 0, "neighbour: float x");
  at::Tensor out = at::full_like(x, NAN);
  launch("selftest_neighbour", &neighbour_kernel, dim3(x.numel() / block), dim3(block), 0,
         global_ptr<const float>(x), global_ptr<float>(out), static_cast<int>(sync));
  return out;
}

inline at::Tensor barrier(const at::Tensor& x, int64_t mode) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "barrier: float x");
  at::Tensor out = at::full_like(x, NAN);
  launch("selftest_barrier", &barrier_kernel, dim3(1), dim3(x.numel()), 0,
         global_ptr<const float>(x), global_ptr<float>(out), mode);
  return out;
}

inline at::Tensor access(const at::Tensor& x, int64_t mode, int64_t offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "access: float x");
  at::Tensor out = at::zeros_like(x);
  launch("selftest_access", &access_kernel, dim3(1), dim3(32), 0, global_ptr<const float>(x),
         global_ptr<float>(out), mode, offset);
  return out;
}

template <typename T, int VEC>
void copy_t(const at::Tensor& x, const at::Tensor& out, int64_t blocks, int64_t threads) {
  const int64_t align = static_cast<int64_t>(sizeof(T)) * VEC;
  const auto addr = reinterpret_cast<uintptr_t>(x.data_ptr());
  const auto oaddr = reinterpret_cast<uintptr_t>(out.data_ptr());
  // elements before the first VEC-aligned one (x and out must agree, else no vector part)
  int64_t head = x.numel();
  if (addr % sizeof(T) == 0 && addr % align == oaddr % align)
    head = static_cast<int64_t>(((align - addr % align) % align) / sizeof(T));
  launch("selftest_copy", &copy_kernel<T, VEC>, dim3(blocks), dim3(threads), 0,
         global_ptr<const T>(x), global_ptr<T>(out), x.numel(), head);
}

// Launches reread_kernel over float x (contiguous) in `blocks` chunks of x.numel() / blocks.
inline at::Tensor reread(const at::Tensor& x, int64_t blocks, int64_t threads) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "reread: contiguous float x");
  TORCH_CHECK(blocks >= 1 && x.numel() % blocks == 0, "reread: blocks must divide x.numel()");
  at::Tensor out = at::empty({blocks * threads}, x.options());
  launch("selftest_reread", &reread_kernel, dim3(blocks), dim3(threads), 0,
         global_ptr<const float>(x), global_ptr<float>(out), x.numel() / blocks);
  return out;
}

// A copy of x (any dtype of 2, 4 or 8 bytes; contiguous), with 16-byte vector accesses.
inline at::Tensor copy(const at::Tensor& x, int64_t blocks, int64_t threads) {
  TORCH_CHECK(x.is_contiguous(), "copy: x must be contiguous");
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  switch (x.element_size()) {
    case 2: copy_t<int16_t, 8>(x.view(at::kShort), out.view(at::kShort), blocks, threads); break;
    case 4: copy_t<float, 4>(x.view(at::kFloat), out.view(at::kFloat), blocks, threads); break;
    case 8: copy_t<double, 2>(x.view(at::kDouble), out.view(at::kDouble), blocks, threads); break;
    default: TORCH_CHECK(false, "copy: element size ", x.element_size());
  }
  return out;
}

// Launches config_kernel (or big_smem_kernel after raising its limit to raise_to bytes, when
// raise_to >= 0) with the given configuration; out (int64) has one entry per thread of the grid.
inline void config(const at::Tensor& out, std::vector<int64_t> grid, std::vector<int64_t> block,
                   int64_t smem, int64_t raise_to) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "config: grid and block are 3 sizes");
  TORCH_CHECK(out.scalar_type() == at::kLong, "config: out must be int64");
  const dim3 g(static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]),
               static_cast<unsigned>(grid[2]));
  const dim3 b(static_cast<unsigned>(block[0]), static_cast<unsigned>(block[1]),
               static_cast<unsigned>(block[2]));
  const int floats = static_cast<int>(smem / 4);
  if (raise_to >= 0) {
    set_max_dynamic_smem(&big_smem_kernel, static_cast<int>(raise_to));
    launch("selftest_big_smem", &big_smem_kernel, g, b, static_cast<size_t>(smem),
           global_ptr<int64_t>(out), floats);
  } else {
    launch("selftest_config", &config_kernel, g, b, static_cast<size_t>(smem),
           global_ptr<int64_t>(out), floats);
  }
}

// out_static, out_dynamic: float32, blocks * threads each.
inline void smem_leak(const at::Tensor& out_static, const at::Tensor& out_dynamic,
                      int64_t threads) {
  TORCH_CHECK(out_static.numel() % threads == 0 && out_dynamic.numel() == out_static.numel(),
              "smem_leak: sizes");
  launch("selftest_smem_leak", &smem_leak_kernel, dim3(out_static.numel() / threads),
         dim3(threads), static_cast<size_t>(threads) * sizeof(float),
         global_ptr<float>(out_static), global_ptr<float>(out_dynamic));
}

// out: float32, blocks * threads.
inline void barrier_loop(const at::Tensor& out, int64_t threads, int64_t iters) {
  TORCH_CHECK(out.numel() % threads == 0, "barrier_loop: sizes");
  launch("selftest_barrier_loop", &barrier_loop_kernel, dim3(out.numel() / threads),
         dim3(threads), 0, global_ptr<float>(out), iters);
}

// The tickets of a grid's blocks (int32 [blocks]); counter: int32 [1], zero.
inline at::Tensor block_order(const at::Tensor& counter, std::vector<int64_t> grid,
                              int64_t threads) {
  TORCH_CHECK(counter.scalar_type() == at::kInt && counter.numel() == 1,
              "block_order: counter must be int32 [1]");
  TORCH_CHECK(grid.size() == 3, "block_order: grid must have 3 dimensions");
  const at::Tensor order = at::full({grid[0] * grid[1] * grid[2]}, -1, counter.options());
  launch("selftest_block_order", &block_order_kernel,
         dim3(static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]),
              static_cast<unsigned>(grid[2])),
         dim3(static_cast<unsigned>(threads)), 0, global_ptr<int>(counter),
         global_ptr<int>(order));
  return order;
}

}  // namespace selftest
}  // namespace cbam
