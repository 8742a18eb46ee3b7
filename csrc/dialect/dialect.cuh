// The kernel dialect: the one header every kernel and launcher source includes.
//
// Under nvcc (__CUDACC__) it maps to CUDA itself. Under g++ with CBAM_SIMULATOR defined it maps to
// the project's SIMT simulator (csrc/sim/), so the very same kernel and launcher sources run on
// the CPU in tests. Kernel sources use only what is listed here (DESIGN.md section 5) and need no
// #ifdef of their own.
//
// What a kernel source may use:
//   CBAM_GLOBAL (= __global__), CBAM_DEVICE (= __device__ __forceinline__), __restrict__,
//   __launch_bounds__(n[, min blocks]), __forceinline__, CBAM_UNROLL (= #pragma unroll under nvcc,
//   before a loop with a compile-time trip count whose arrays must stay in registers; nothing in
//   the simulator), CBAM_NO_UNROLL (= #pragma unroll 1: one copy of a loop's body)
//   threadIdx, blockIdx, blockDim, gridDim (.x .y .z, unsigned int)
//   __syncthreads(), __syncwarp(mask = full)
//   __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync (full mask 0xffffffff only;
//   values: int, unsigned, long long, float, double, c10::Half, c10::BFloat16 ...),
//   __ballot_sync, __any_sync, __all_sync, warpSize
//   __shared__ fixed-size arrays; CBAM_DYNAMIC_SMEM(type, name) for dynamic shared memory
//   global memory ONLY through cbam::ld / cbam::st (scalar) and cbam::ld_vec / cbam::st_vec
//   (N elements, N * sizeof(T) bytes aligned to that size, at most 16 bytes); cbam::ld_cg (a
//   scalar load from L2, not L1: values other blocks of the launch wrote), cbam::atomic_ticket
//   (atomicAdd(p, 1) on an int, the value before; the only atomic) and cbam::fence_gpu
//   (__threadfence), for the last-block pattern of kernels/combine_partials.cuh
//   c10::Half, c10::BFloat16, at::opmath_type<T>, and standard math (cbam::isnan, cbam::exp_acc,
//   cbam::log_acc, cbam::sqrt_acc, cbam::erf_acc below, for the accumulation types float and
//   double)
//   cbam::grid_dependency_sync(): the first statement of every kernel, before any global memory
//   access (the simulator refuses one before it; tests/test_codegen.py checks nvcc's PTX). On
//   sm_90+ it waits until the grids this one depends on have completed and their writes are
//   visible (griddepcontrol.wait), then lets the next kernel of the stream launch
//   (griddepcontrol.launch_dependents): under programmatic dependent launch (set_pdl) that next
//   kernel's launch and block scheduling overlap this one's last wave instead of following its
//   end. Without it (the default, and before sm_90) both are no-ops.
//
// What a launcher (host code) may use:
//   cbam::global_ptr<T>(tensor)  -> the tensor's data as T* (the simulator also records the
//                                   tensor's byte range as memory the launch may touch)
//   cbam::launch(name, kernel, grid, block, smem_bytes, args...)
//                                 -> nvcc: kernel<<<grid, block, smem, current stream>>>(args...)
//                                    then C10_CUDA_KERNEL_LAUNCH_CHECK(); with cbam::pdl_mode 1
//                                    on an sm_90+ device, cudaLaunchKernelEx with programmatic
//                                    stream serialization (checked likewise);
//                                    simulator: runs the whole grid, then checks it
//   cbam::set_max_dynamic_smem(kernel, bytes)  -> raises the dynamic shared-memory limit
//   cbam::max_grid_y(), cbam::num_sms()         -> hardware limits for grid sizing
//   cbam::stream_id(), cbam::stream_capturing()  -> the current stream (its id; whether a CUDA
//                                                  graph is being captured on it)
//   cbam::zero_async(ptr, bytes)                -> cudaMemsetAsync(ptr, 0, bytes, current stream)
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "launch_options.h"

#if defined(__CUDACC__)
// ------------------------------------------------------------------------------------- nvcc
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define CBAM_GLOBAL __global__
#define CBAM_DEVICE __device__ __forceinline__
#define CBAM_HOST_DEVICE __host__ __device__ __forceinline__
#define CBAM_UNROLL _Pragma("unroll")
#define CBAM_NO_UNROLL _Pragma("unroll 1")
#define CBAM_DYNAMIC_SMEM(type, name)                                  \
  extern __shared__ __align__(16) unsigned char cbam_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(cbam_dynamic_smem_)

namespace cbam {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <typename T>
CBAM_DEVICE T ld(const T* p) {
  return *p;
}
template <typename T>
CBAM_DEVICE void st(T* p, T v) {
  *p = v;
}
// p must be aligned to N * sizeof(T) bytes; N * sizeof(T) is a power of two of at most 16.
template <int N, typename T>
CBAM_DEVICE Vec<T, N> ld_vec(const T* p) {
  static_assert(N >= 1 && sizeof(T) * N <= 16 && (sizeof(T) * N & (sizeof(T) * N - 1)) == 0,
                "ld_vec: N * sizeof(T) must be a power of two of at most 16 bytes");
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
// Vector stores are written as PTX: nvcc splits a store of Vec (a struct of an array), and of a
// uint4 made from it, into one store per element when the values were computed in registers
// (four 4-byte STG.E instead of one STG.E.128, seen in apply_gates and grad_input with nvcc 13.0).
// As in CUTLASS's global_store: volatile, no memory clobber (no kernel reads what it stores).
// tests/test_codegen.py checks the PTX of every vector-path kernel.
template <int N, typename T>
CBAM_DEVICE void st_vec(T* p, const Vec<T, N>& v) {
  static_assert(N >= 1 && sizeof(T) * N <= 16 && (sizeof(T) * N & (sizeof(T) * N - 1)) == 0,
                "st_vec: N * sizeof(T) must be a power of two of at most 16 bytes");
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  if constexpr (kBytes == 16) {
    uint4 w;
    memcpy(&w, &v, 16);
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y),
                 "r"(w.z), "r"(w.w));
  } else if constexpr (kBytes == 8) {
    uint2 w;
    memcpy(&w, &v, 8);
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(w.x), "r"(w.y));
  } else {
    *reinterpret_cast<Vec<T, N>*>(p) = v;  // one element of at most 4 bytes, or two 16-bit
  }
}

// A load served by L2, not L1 (ld.global.cg): the partials that other blocks of the launch
// wrote, read by the last block of their group after fence_gpu (combine_partials.cuh).
template <typename T>
CBAM_DEVICE T ld_cg(const T* p) {
  return __ldcg(p);
}
// atomicAdd(p, 1): the value before. Integer counters only: no floating-point atomics (the
// reductions' results must not depend on the order blocks finish in).
CBAM_DEVICE int atomic_ticket(int* p) { return atomicAdd(p, 1); }
CBAM_DEVICE void fence_gpu() { __threadfence(); }

// The first statement of every kernel (see the list above). "memory": no global access of the
// kernel moves above the wait.
CBAM_DEVICE void grid_dependency_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <typename T>
inline T* global_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Whether the current device runs programmatic dependent launches (sm_90 and later).
inline bool device_has_pdl() { return at::cuda::getCurrentDeviceProperties()->major >= 9; }

template <typename... KArgs, typename... Args>
inline void launch(const char* /*name*/, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                   size_t smem_bytes, Args&&... args) {
  if (pdl_mode == 1 && device_has_pdl()) {
    // This kernel may launch once the stream's previous kernel has let it (its blocks' first
    // statement, grid_dependency_sync); it waits there for that kernel's completion itself.
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem_bytes;
    config.stream = at::cuda::getCurrentCUDAStream();
    config.attrs = attr;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  kernel<<<grid, block, smem_bytes, at::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename... KArgs>
inline void set_max_dynamic_smem(void (*kernel)(KArgs...), int bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

inline int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}
inline unsigned max_grid_y() { return 65535u; }

inline int64_t stream_id() { return at::cuda::getCurrentCUDAStream().id(); }
inline bool stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;
}
inline void zero_async(void* p, size_t bytes) {
  C10_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, at::cuda::getCurrentCUDAStream()));
}

}  // namespace cbam

// Warp shuffles of c10::Half and c10::BFloat16 (CUDA's own overloads take __half and
// __nv_bfloat16; the simulator's shuffles take any type of at most 8 bytes): move the 16 bits.
#define CBAM_SHFL_16BIT(fn, T, Arg)                                                           \
  __device__ __forceinline__ T fn(unsigned mask, T var, Arg arg, int width = 32) {           \
    return T(static_cast<unsigned short>(fn(mask, static_cast<unsigned>(var.x), arg, width)), \
             T::from_bits());                                                                \
  }
CBAM_SHFL_16BIT(__shfl_sync, c10::Half, int)
CBAM_SHFL_16BIT(__shfl_up_sync, c10::Half, unsigned int)
CBAM_SHFL_16BIT(__shfl_down_sync, c10::Half, unsigned int)
CBAM_SHFL_16BIT(__shfl_xor_sync, c10::Half, int)
CBAM_SHFL_16BIT(__shfl_sync, c10::BFloat16, int)
CBAM_SHFL_16BIT(__shfl_up_sync, c10::BFloat16, unsigned int)
CBAM_SHFL_16BIT(__shfl_down_sync, c10::BFloat16, unsigned int)
CBAM_SHFL_16BIT(__shfl_xor_sync, c10::BFloat16, int)
#undef CBAM_SHFL_16BIT

#elif defined(CBAM_SIMULATOR)
// -------------------------------------------------------------------------------- simulator
// Provides the same names (threadIdx ..., __syncthreads ..., cbam::Vec, cbam::ld ...,
// cbam::launch ...) on the CPU; see csrc/sim/runtime.h.
#include "../sim/runtime.h"
#define CBAM_UNROLL  // (g++ warns about nvcc's pragma, and -Werror makes that fatal)
#define CBAM_NO_UNROLL

#else
#error "dialect.cuh: compile with nvcc, or with g++ and -DCBAM_SIMULATOR"
#endif

namespace cbam {

// Standard math that both compilers accept in device code.
template <typename T>
CBAM_HOST_DEVICE bool isnan(T v) {
  return v != v;
}

// exp, log, sqrt and erf of the accumulation types (float, double) under both compilers: the
// accurate libm / CUDA functions (expf, not the fast __expf), so both builds round the same way
// up to the libraries' documented ulp bounds.
CBAM_HOST_DEVICE float exp_acc(float v) { return ::expf(v); }
CBAM_HOST_DEVICE double exp_acc(double v) { return ::exp(v); }
CBAM_HOST_DEVICE float log_acc(float v) { return ::logf(v); }
CBAM_HOST_DEVICE double log_acc(double v) { return ::log(v); }
CBAM_HOST_DEVICE float sqrt_acc(float v) { return ::sqrtf(v); }
CBAM_HOST_DEVICE double sqrt_acc(double v) { return ::sqrt(v); }
CBAM_HOST_DEVICE float erf_acc(float v) { return ::erff(v); }
CBAM_HOST_DEVICE double erf_acc(double v) { return ::erf(v); }

// 64-bit index type used when a tensor may hold 2^31 elements or more.
using index_t = int64_t;

}  // namespace cbam
