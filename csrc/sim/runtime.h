// The SIMT simulator: the g++ half of the kernel dialect (csrc/dialect/dialect.cuh).
//
// With -DCBAM_SIMULATOR, dialect.cuh includes this header instead of CUDA, so the very same kernel
// and launcher sources that nvcc compiles run on the CPU (DESIGN.md section 5, issue 3).
//
// Execution model
//   * cbam::launch validates the launch like the hardware does, then runs the grid one block at a
//     time: in linear order (x fastest) under the "forward" schedule, in reverse linear order under
//     "reverse", in a seeded random order under "shuffle" (below). Each CUDA thread of the block
//     is a fiber with its own 256 KiB stack (a hand-written register switch on x86-64, ucontext
//     elsewhere or with -DCBAM_SIM_UCONTEXT; stacks are allocated once and reused); all fibers
//     run in the launching OS thread, so `__shared__` is plain `static` storage and the dynamic
//     shared memory is one buffer, both shared by the block.
//   * Fibers run cooperatively. A fiber runs until it reaches a synchronisation point
//     (__syncthreads, or a warp collective: __syncwarp, shuffles, ballot/any/all) or exits. When no
//     fiber can run, the scheduler resolves warp collectives whose live lanes have all arrived, and
//     releases __syncthreads once every live (not exited) thread of the block waits at it. The
//     order in which runnable fibers run between two synchronisation points is the schedule:
//     "forward" (thread 0 first), "reverse", or "shuffle" (a seeded permutation, drawn anew each
//     time). A kernel whose result depends on that order has a race.
//   * Threads that exited stop counting for barriers and warp collectives. A barrier or warp
//     collective that cannot complete is reported as an error naming the kernel, block and
//     threads; it never hangs: a live thread of the block waits elsewhere (deadlock), the threads
//     wait at different __syncthreads call sites (undefined on a GPU), or the live lanes of a warp
//     wait at different warp operations (a shuffle of another mode, a vote, a value of another
//     size). Lanes may reach the same warp operation from different call sites, as on sm_70+.
//     (A thread spinning on memory without a synchronisation point does hang: the simulator
//     cannot preempt it.)
//   * Warps are groups of 32 consecutive linear thread ids (x fastest, then y, then z); the last
//     warp of a block whose size is not a multiple of 32 has fewer lanes. A shuffle that reads a
//     lane that does not exist or has exited returns poison (all bytes 0xff: NaN for floating
//     types, -1 for signed integers), as the value is undefined on hardware. Shuffles follow PTX
//     shfl.sync exactly (segments of `width` lanes; only the low 5 bits of srcLane / delta /
//     laneMask count; a source outside the segment gives the lane its own value). Only the full
//     mask 0xffffffff is supported (the dialect's rule); any other mask is an error.
//   * A thread accesses global memory only after it has called cbam::grid_dependency_sync(), the
//     first statement of every kernel (on a GPU, under programmatic dependent launch, the kernel
//     before it may still be running until then); an access before it is an error.
//   * Global memory is accessed only through cbam::ld / st / ld_vec / st_vec. Each access must lie
//     inside a tensor handed to cbam::global_ptr for this launch (the launcher's global_ptr calls
//     since the previous launch; a launch with no global_ptr call since the previous launch reuses
//     that launch's tensors), be aligned (scalars to alignof(T), vectors to N * sizeof(T), at most
//     16 bytes), and stores must target a tensor registered through a non-const T. The bytes
//     read and written are counted per launch (cbam::sim::launch_stats()).
//   * The dynamic shared memory buffer is poisoned (0xff bytes) before every block, and so is
//     every static `__shared__` variable declared in the kernel function itself (found in the
//     extension's ELF symbol table, see shared_poison.h), so a block never sees a previous
//     block's values.
//   * Every error (invalid launch, out-of-bounds or misaligned access, deadlock, an exception
//     thrown by kernel code, a stack overflow or segmentation fault in a simulated thread) is
//     recorded in the fiber where it happens; the block's fibers are unwound and the launching
//     thread throws a c10::Error (a Python RuntimeError). No exception crosses a fiber boundary;
//     nothing aborts the process. Launches are serialised by a mutex.
//
// Not checked (a GPU may fail where the simulator passes): __launch_bounds__ (launching more
// threads than the bound); global memory touched through raw pointers instead of cbam::ld/st
// (only a fault is caught); shared-memory indices out of range; `__shared__` variables declared
// in helper functions are not poisoned between blocks; static plus dynamic shared memory above
// 227 KiB; a thread spinning on memory without a synchronisation point hangs. Nor does it model
// speed: shared-memory bank conflicts, or the width of the instructions nvcc makes of ld_vec /
// st_vec (tests/test_codegen.py reads nvcc's PTX for that). Its L2 model (set_l2_model, off by
// default) counts the bytes loads would fetch from DRAM through an idealised cache: a model of
// traffic, not of time, and blocks that run one after another, not a few hundred at once.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../dialect/launch_options.h"  // cbam::pdl_mode: recorded in each launch's stats

// (Kernel sources write nvcc's `#pragma unroll` as CBAM_UNROLL, empty here: dialect.cuh.)

// ------------------------------------------------------------------------ CUDA keywords, types
#define CBAM_GLOBAL
#define CBAM_DEVICE inline
#define CBAM_HOST_DEVICE inline
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// One block runs at a time, all its threads in one OS thread: static storage is shared memory.
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned int x, y, z;
};

namespace cbam {
namespace sim {

// The running thread's coordinates; the scheduler sets them before it resumes a fiber.
extern uint3 g_threadIdx;
extern uint3 g_blockIdx;
extern dim3 g_blockDim;
extern dim3 g_gridDim;

}  // namespace sim
}  // namespace cbam

#define threadIdx (static_cast<const ::uint3&>(::cbam::sim::g_threadIdx))
#define blockIdx (static_cast<const ::uint3&>(::cbam::sim::g_blockIdx))
#define blockDim (static_cast<const ::dim3&>(::cbam::sim::g_blockDim))
#define gridDim (static_cast<const ::dim3&>(::cbam::sim::g_gridDim))
constexpr int warpSize = 32;

namespace cbam {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

namespace sim {

// --------------------------------------------------------------------------- synchronisation
enum class Op : uint8_t {
  None = 0,
  SyncThreads,
  SyncWarp,
  ShflIdx,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
};

struct Site {
  const char* file;
  const char* function;
  unsigned line;
  unsigned column;
};

inline Site site_of(const std::source_location& loc) {
  return Site{loc.file_name(), loc.function_name(), static_cast<unsigned>(loc.line()),
              static_cast<unsigned>(loc.column())};
}

// Blocks the calling fiber at __syncthreads until the block's live threads all arrive.
void sync_threads(const Site& site);
// A warp collective: `value` (size bytes, <= 8) goes in, the result comes back in the same
// buffer. arg: srcLane / delta / laneMask or the predicate; returns the ballot/any/all result.
uint32_t warp_op(Op op, uint32_t mask, void* value, unsigned size, int arg, int width,
                 const Site& site);

// ------------------------------------------------------------------------------ global memory
struct Region {
  uintptr_t lo, hi;  // [lo, hi)
  bool writable;
  // the address of the launch's first access to the region, in the order the blocks and threads
  // ran (0: none yet): where a pass over a tensor starts (the tile order of a reversed pass)
  mutable uintptr_t first = 0;
};

inline constexpr bool kSyncedOutsideKernels = true;  // MemState::synced between fibers

struct MemState {
  const Region* regions = nullptr;  // the running launch's tensors
  size_t n_regions = 0;
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t bytes_vec = 0;   // of those, read or written by 16-byte accesses (ld_vec / st_vec)
  uint64_t bytes_vec8 = 0;  // and by 8-byte vector accesses (ld_vec / st_vec of 8 bytes)
  bool l2_on = false;          // the L2 model is on (set_l2_model): every access goes through it
  uint64_t l2_miss_bytes = 0;  // under it, the bytes the launch's loads fetched from DRAM
  // whether the running thread has called cbam::grid_dependency_sync() (its fiber's flag)
  const bool* synced = &kSyncedOutsideKernels;
};
extern MemState g_mem;

// The L2 model, a traffic model and nothing else: fully associative, least recently used, 32-byte
// sectors (a GPU's L2 fetches from DRAM in sectors of 32 bytes), a store allocates its sectors
// without fetching them (write-back, byte-masked), a load that finds its sector absent fetches it
// (l2_miss_bytes). The simulator runs a launch's blocks one at a time; the model logs each block's
// accesses and replays the launch as a GPU interleaves it: as many blocks as the modelled GPU holds
// at once (sms times the blocks an SM holds by threads_per_sm, at most 32, and by shared memory)
// start together in the order the simulator ran them (blockIdx order under the forward schedule, as
// a GPU roughly starts them) and take one access each in turn; a block that ends hands its slot to
// the next; cbam::num_sms() says `sms` meanwhile, so the launchers size their grids for that GPU
// too. Within a block, accesses are logged in the simulator's thread order (a thread runs to its
// next barrier), not in warp lockstep: the order of a block's own accesses is modelled only up to
// its barriers. Its contents last across launches, so the passes of an op or a CBAM block meet (or
// miss) what the passes before them left there. Off by default; set_l2_model(capacity, ...) empties
// it and turns it on (capacity 0 turns it off).
void l2_access(uintptr_t a, size_t bytes, bool write);
void set_l2_model(uint64_t capacity_bytes, int64_t sms, int64_t threads_per_sm);
uint64_t l2_model_capacity();

[[noreturn]] void access_error(const void* p, size_t bytes, size_t align, bool write,
                               const char* what);
[[noreturn]] void unsynced_error(const void* p, bool write, const char* what);
// cbam::grid_dependency_sync(): marks the running thread as past it.
void grid_dependency_sync();

// vec: an access of ld_vec / st_vec (an 8-byte one counts in bytes_vec8; a scalar double does not)
inline void check_access(const void* p, size_t bytes, size_t align, bool write, const char* what,
                         bool vec = false) {
  if (!*g_mem.synced) unsynced_error(p, write, what);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if ((a & (align - 1)) != 0) access_error(p, bytes, align, write, what);
  for (size_t i = 0; i < g_mem.n_regions; ++i) {
    const Region& r = g_mem.regions[i];
    if (a >= r.lo && a + bytes <= r.hi && (r.writable || !write)) {
      if (r.first == 0) r.first = a;
      (write ? g_mem.bytes_written : g_mem.bytes_read) += bytes;
      if (bytes == 16) g_mem.bytes_vec += bytes;
      if (vec && bytes == 8) g_mem.bytes_vec8 += bytes;
      if (g_mem.l2_on) l2_access(a, bytes, write);
      return;
    }
  }
  access_error(p, bytes, align, write, what);
}

// Records a tensor's bytes as memory the next launch may access (see cbam::global_ptr).
void register_region(const at::Tensor& t, bool writable, c10::ScalarType expected);

template <typename T>
constexpr c10::ScalarType scalar_type_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return c10::ScalarType::Float;
  else if constexpr (std::is_same_v<U, double>) return c10::ScalarType::Double;
  else if constexpr (std::is_same_v<U, c10::Half>) return c10::ScalarType::Half;
  else if constexpr (std::is_same_v<U, c10::BFloat16>) return c10::ScalarType::BFloat16;
  else if constexpr (std::is_same_v<U, bool>) return c10::ScalarType::Bool;
  else if constexpr (std::is_same_v<U, int8_t>) return c10::ScalarType::Char;
  else if constexpr (std::is_same_v<U, uint8_t>) return c10::ScalarType::Byte;
  else if constexpr (std::is_same_v<U, int16_t>) return c10::ScalarType::Short;
  else if constexpr (std::is_same_v<U, int32_t>) return c10::ScalarType::Int;
  else if constexpr (std::is_same_v<U, int64_t>) return c10::ScalarType::Long;
  else return c10::ScalarType::Undefined;  // any other T: only the range is checked
}

// ------------------------------------------------------------------------------------ launch
// A type-erased reference to the kernel call (valid during run_grid).
struct KernelBody {
  void* obj;
  void (*call)(void*);
};

void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem_bytes,
              KernelBody body);
void set_max_dynamic_smem(const void* kernel, long long bytes);
void* dynamic_smem();

// Schedules and statistics (exposed to Python by module.cpp).
enum class Schedule { Forward, Reverse, Shuffle };
void set_schedule(Schedule s, uint64_t seed);
Schedule schedule();
uint64_t schedule_seed();

struct LaunchStat {
  std::string name;
  uintptr_t kernel;  // the kernel function's address: which template instance ran
  dim3 grid, block;
  size_t smem_bytes;
  uint64_t bytes_read, bytes_written, bytes_vec, bytes_vec8;
  std::vector<Region> regions;  // the launch's tensors, with the first access to each
  bool l2_on;                   // the L2 model was on: l2_miss_bytes holds its DRAM reads
  uint64_t l2_miss_bytes;
  bool pdl;  // launched with cbam::pdl_mode 1 (programmatic dependent launch on a GPU)
};
std::vector<LaunchStat> launch_stats();
void clear_launch_stats();

}  // namespace sim

// ----------------------------------------------------------------- global memory (dialect API)
template <typename T>
inline T ld(const T* p) {
  sim::check_access(p, sizeof(T), alignof(T), false, "load");
  T v;
  std::memcpy(static_cast<void*>(&v), static_cast<const void*>(p), sizeof(T));
  return v;
}
template <typename T>
inline void st(T* p, T v) {
  sim::check_access(p, sizeof(T), alignof(T), true, "store");
  std::memcpy(static_cast<void*>(p), static_cast<const void*>(&v), sizeof(T));
}
// p must be aligned to N * sizeof(T) bytes; N * sizeof(T) is a power of two of at most 16.
template <int N, typename T>
inline Vec<T, N> ld_vec(const T* p) {
  static_assert(N >= 1 && sizeof(T) * N <= 16 && (sizeof(T) * N & (sizeof(T) * N - 1)) == 0,
                "ld_vec: N * sizeof(T) must be a power of two of at most 16 bytes");
  sim::check_access(p, sizeof(T) * N, sizeof(T) * N, false, "vector load", true);
  Vec<T, N> v;
  std::memcpy(static_cast<void*>(&v), static_cast<const void*>(p), sizeof(T) * N);
  return v;
}
template <int N, typename T>
inline void st_vec(T* p, const Vec<T, N>& v) {
  static_assert(N >= 1 && sizeof(T) * N <= 16 && (sizeof(T) * N & (sizeof(T) * N - 1)) == 0,
                "st_vec: N * sizeof(T) must be a power of two of at most 16 bytes");
  sim::check_access(p, sizeof(T) * N, sizeof(T) * N, true, "vector store", true);
  std::memcpy(static_cast<void*>(p), static_cast<const void*>(&v), sizeof(T) * N);
}

// Blocks run one at a time, each to its end, so every store of a finished block is visible to
// the later ones: ld_cg is ld, fence_gpu does nothing, and atomic_ticket needs no lock (the
// fibers of a block run in one OS thread, one at a time). The simulator's schedules run the
// blocks in different orders (run_grid), so that which block of a group comes last varies.
template <typename T>
inline T ld_cg(const T* p) {
  return ld(p);
}
inline int atomic_ticket(int* p) {
  sim::check_access(p, sizeof(int), alignof(int), false, "atomic");
  sim::check_access(p, sizeof(int), alignof(int), true, "atomic");
  int v;
  std::memcpy(&v, p, sizeof(int));
  const int next = v + 1;
  std::memcpy(p, &next, sizeof(int));
  return v;
}
inline void fence_gpu() {}
inline void grid_dependency_sync() { sim::grid_dependency_sync(); }

// The tensor's data as T*; records its byte range as memory the next launch may touch (writable
// unless T is const). A dtype that does not match T (for the scalar types torch knows) is an error.
template <typename T>
inline T* global_ptr(const at::Tensor& t) {
  sim::register_region(t, !std::is_const_v<T>, sim::scalar_type_of<T>());
  return reinterpret_cast<T*>(t.data_ptr());
}

// Runs the whole grid in the simulator; throws c10::Error on an invalid launch or on any error
// inside the kernel. Arguments are converted to the kernel's parameter types first (as CUDA does),
// then every thread gets its own copy.
template <typename... KArgs, typename... Args>
inline void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                   size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args),
                "cbam::launch: the number of arguments does not match the kernel's parameters");
  struct Call {
    void (*kernel)(KArgs...);
    std::tuple<std::decay_t<KArgs>...> args;
    static void invoke(void* self) {
      auto* c = static_cast<Call*>(self);
      std::apply([c](const auto&... a) { c->kernel(a...); }, c->args);
    }
  };
  Call call{kernel, std::tuple<std::decay_t<KArgs>...>(std::forward<Args>(args)...)};
  sim::run_grid(name, reinterpret_cast<const void*>(kernel), grid, block, smem_bytes,
                sim::KernelBody{&call, &Call::invoke});
}

template <typename... KArgs>
inline void set_max_dynamic_smem(void (*kernel)(KArgs...), int bytes) {
  sim::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

int num_sms();  // 132, H100-like; under the L2 model, the SMs it models (set_l2_model)
inline unsigned max_grid_y() { return 65535u; }
// One stream (id 0). stream_capturing() is false unless a test says otherwise
// (sim::set_capturing), to run the launchers' CUDA-graph path.
inline int64_t stream_id() { return 0; }
bool stream_capturing();
inline void zero_async(void* p, size_t bytes) { std::memset(p, 0, bytes); }
namespace sim {
void set_capturing(bool on);
}  // namespace sim

}  // namespace cbam

// Dynamic shared memory: one 16-byte aligned buffer of the launch's smem_bytes, poisoned per block.
#define CBAM_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::cbam::sim::dynamic_smem())

// ----------------------------------------------------------------------- block and warp sync
inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  ::cbam::sim::sync_threads(::cbam::sim::site_of(loc));
}

inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location loc = std::source_location::current()) {
  ::cbam::sim::warp_op(::cbam::sim::Op::SyncWarp, mask, nullptr, 0, 0, 32,
                       ::cbam::sim::site_of(loc));
}

namespace cbam {
namespace sim {
template <typename T>
inline T shuffle(Op op, unsigned mask, T var, int arg, int width, const std::source_location& loc) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move values of at most 8 bytes");
  unsigned char buf[8];
  std::memcpy(buf, static_cast<const void*>(&var), sizeof(T));
  warp_op(op, mask, buf, sizeof(T), arg, width, site_of(loc));
  T r;
  std::memcpy(static_cast<void*>(&r), buf, sizeof(T));
  return r;
}
}  // namespace sim
}  // namespace cbam

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32,
                     std::source_location loc = std::source_location::current()) {
  return ::cbam::sim::shuffle(::cbam::sim::Op::ShflIdx, mask, var, srcLane, width, loc);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = 32,
                        std::source_location loc = std::source_location::current()) {
  return ::cbam::sim::shuffle(::cbam::sim::Op::ShflUp, mask, var, static_cast<int>(delta & 31u),
                              width, loc);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = 32,
                          std::source_location loc = std::source_location::current()) {
  return ::cbam::sim::shuffle(::cbam::sim::Op::ShflDown, mask, var, static_cast<int>(delta & 31u),
                              width, loc);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32,
                         std::source_location loc = std::source_location::current()) {
  return ::cbam::sim::shuffle(::cbam::sim::Op::ShflXor, mask, var, laneMask, width, loc);
}
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location loc = std::source_location::current()) {
  return ::cbam::sim::warp_op(::cbam::sim::Op::Ballot, mask, nullptr, 0, predicate != 0, 32,
                              ::cbam::sim::site_of(loc));
}
inline int __any_sync(unsigned mask, int predicate,
                      std::source_location loc = std::source_location::current()) {
  return static_cast<int>(::cbam::sim::warp_op(::cbam::sim::Op::Any, mask, nullptr, 0,
                                               predicate != 0, 32, ::cbam::sim::site_of(loc)));
}
inline int __all_sync(unsigned mask, int predicate,
                      std::source_location loc = std::source_location::current()) {
  return static_cast<int>(::cbam::sim::warp_op(::cbam::sim::Op::All, mask, nullptr, 0,
                                               predicate != 0, 32, ::cbam::sim::site_of(loc)));
}
