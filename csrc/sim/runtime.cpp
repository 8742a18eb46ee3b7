// The SIMT simulator's runtime: fibers, the block scheduler, barriers and warp collectives, launch
// validation, global-memory regions and launch statistics. See runtime.h for the model.
#include "dialect/dialect.cuh"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <exception>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <unordered_map>

#include "sim/shared_poison.h"


// ------------------------------------------------------------------------ context switching
// x86-64: a minimal switch of the callee-saved registers, MXCSR and the x87 control word (no
// signal-mask system call, unlike swapcontext: about 10x faster). Elsewhere, or with
// -DCBAM_SIM_UCONTEXT: ucontext.
#if defined(__x86_64__) && defined(__linux__) && !defined(CBAM_SIM_UCONTEXT)
#define CBAM_SIM_FAST_SWITCH 1
asm(R"(
  .text
  .p2align 4
  .globl cbam_sim_switch
  .hidden cbam_sim_switch
  .type cbam_sim_switch,@function
cbam_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cbam_sim_switch,.-cbam_sim_switch
)");
// Saves the running context's stack pointer in *save and continues on the stack `to`.
extern "C" void cbam_sim_switch(void** save, void* to);
#endif

namespace cbam {
namespace sim {

uint3 g_threadIdx{0, 0, 0};
uint3 g_blockIdx{0, 0, 0};
dim3 g_blockDim{1, 1, 1};
dim3 g_gridDim{1, 1, 1};
MemState g_mem;

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per fiber; reserved, only touched pages are used
constexpr size_t kGuardBytes = 64 * 1024;   // inaccessible, below each stack
constexpr int kMaxThreads = 1024;
constexpr long long kDefaultSmem = 48 * 1024;
constexpr long long kMaxSmem = 227 * 1024;
constexpr unsigned char kPoison = 0xff;

enum class FState : uint8_t { Fresh, Ready, Waiting, Done };

// Thrown inside a fiber to unwind it when its block is abandoned after an error.
struct FiberAbort {};

struct Ctx {
#ifdef CBAM_SIM_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

inline void ctx_switch(Ctx* save, Ctx* to) {
#ifdef CBAM_SIM_FAST_SWITCH
  cbam_sim_switch(&save->sp, to->sp);
#else
  swapcontext(&save->uc, &to->uc);
#endif
}

struct Fiber {
  Ctx ctx;
  char* stack = nullptr;  // kStackBytes usable, kGuardBytes of guard below
  FState state = FState::Fresh;
  bool abort = false;
  Op op = Op::None;
  Site site{};
  uint32_t mask = 0;
  int arg = 0;
  int width = 32;
  unsigned size = 0;
  unsigned char value[8] = {};
  uint32_t result = 0;
  uint3 tid{0, 0, 0};
  bool synced = false;  // past cbam::grid_dependency_sync()
};

struct Sim {
  std::mutex mu;
  std::unique_ptr<Fiber[]> fibers{new Fiber[kMaxThreads]};
  int n_stacks = 0;
  Ctx sched_ctx;
  Fiber* cur = nullptr;
  KernelBody body{nullptr, nullptr};
  int n_threads = 0;
  std::vector<int> ready;
  // the first error of the running block
  bool has_error = false;
  std::string error;
  // schedule
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 0;
  std::mt19937_64 rng{0};
  // per-kernel dynamic shared memory limits (set_max_dynamic_smem)
  std::unordered_map<const void*, long long> smem_limit;
  std::vector<LaunchStat> stats;
  // a fault (SIGSEGV/SIGBUS) inside the running fiber, noted by the signal handler
  volatile sig_atomic_t fault = 0;
  char fault_msg[256] = {};
  alignas(128) unsigned char smem[kMaxSmem];
};

Sim& S() {
  static Sim* s = new Sim();  // never destroyed: fibers may be referenced at exit
  return *s;
}

// Regions handed to global_ptr since the last launch of this OS thread, and that launch's.
// A pending region keeps a weak reference to its tensor's storage: regions of tensors freed
// before the launch (say, a launcher that failed after global_ptr) are dropped.
struct Pending {
  Region region;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
};
thread_local std::vector<Pending> t_pending;
thread_local std::vector<Region> t_last;
thread_local bool t_in_launch = false;

const char* op_name(Op op) {
  switch (op) {
    case Op::SyncThreads: return "__syncthreads";
    case Op::SyncWarp: return "__syncwarp";
    case Op::ShflIdx: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
    default: return "?";
  }
}

std::string site_str(const Site& s) {
  std::ostringstream o;
  o << (s.file ? s.file : "?") << ":" << s.line;
  return o.str();
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && a.column == b.column &&
         (a.file == b.file || (a.file && b.file && std::strcmp(a.file, b.file) == 0)) &&
         (a.function == b.function ||
          (a.function && b.function && std::strcmp(a.function, b.function) == 0));
}

std::string dim_str(unsigned x, unsigned y, unsigned z) {
  std::ostringstream o;
  o << "(" << x << "," << y << "," << z << ")";
  return o.str();
}

// "0-15,32,40-47" from sorted ids
std::string ranges(const std::vector<int>& ids) {
  std::ostringstream o;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i) o << ",";
    o << ids[i];
    if (j > i) o << "-" << ids[j];
    i = j + 1;
  }
  return o.str();
}

void record_error(Fiber* f, const std::string& msg) {
  Sim& s = S();
  if (s.has_error) return;
  s.has_error = true;
  std::ostringstream o;
  if (f) o << "thread " << dim_str(f->tid.x, f->tid.y, f->tid.z) << ": ";
  o << msg;
  s.error = o.str();
}

void fiber_entry() {
  Sim& s = S();
  Fiber* f = s.cur;
  try {
    s.body.call(s.body.obj);
  } catch (const FiberAbort&) {
  } catch (const c10::Error& e) {
    record_error(f, e.what_without_backtrace());
  } catch (const std::exception& e) {
    record_error(f, std::string("exception in kernel code: ") + e.what());
  } catch (...) {
    record_error(f, "unknown exception in kernel code");
  }
  f->state = FState::Done;
  f->op = Op::None;
  Ctx dead;  // never resumed
  ctx_switch(&dead, &s.sched_ctx);
  __builtin_unreachable();
}

// Prepares fiber f to start in fiber_entry on its (reused) stack.
void ctx_start(Fiber& f) {
#ifdef CBAM_SIM_FAST_SWITCH
  uint64_t* sp = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);  // 16-byte aligned
  *--sp = 0;  // fiber_entry's return address (it never returns); rsp % 16 == 8 at its entry
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);  // where cbam_sim_switch returns to
  for (int r = 0; r < 6; ++r) *--sp = 0;              // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  f.ctx.sp = sp;
#else
  f.ctx.uc.uc_stack.ss_sp = f.stack;
  f.ctx.uc.uc_stack.ss_size = kStackBytes;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, &fiber_entry, 0);
#endif
}

void ensure_stacks(int n) {
  Sim& s = S();
  while (s.n_stacks < n) {
    void* mem = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "cbam simulator: cannot allocate a fiber stack");
    // guard: a stack overflow faults (reported as an error) instead of corrupting memory
    mprotect(mem, kGuardBytes, PROT_NONE);
    Fiber& f = s.fibers[s.n_stacks];
    f.stack = static_cast<char*>(mem) + kGuardBytes;
#ifndef CBAM_SIM_FAST_SWITCH
    TORCH_CHECK(getcontext(&f.ctx.uc) == 0, "cbam simulator: getcontext failed");
#endif
    ++s.n_stacks;
  }
}

void resume(Fiber* f) {
  Sim& s = S();
  s.cur = f;
  g_threadIdx = f->tid;
  g_mem.synced = &f->synced;
  f->state = FState::Ready;
  ctx_switch(&s.sched_ctx, &f->ctx);
  s.cur = nullptr;
  g_mem.synced = &kSyncedOutsideKernels;
  if (s.fault) {
    s.fault = 0;
    record_error(f, s.fault_msg);
  }
}

// ------------------------------------------------------------------- faults inside a fiber
// While a launch runs, SIGSEGV and SIGBUS raised by the running fiber (a stack overflow into the
// guard, or a raw pointer dereference gone wrong) become an error of that thread: the handler
// (on an alternate stack) abandons the fiber and returns to the scheduler. Faults elsewhere go to
// the previous handlers.
struct FaultGuard {
  static constexpr size_t kAltStack = 64 * 1024;
  static inline char* alt = nullptr;
  static inline pthread_t owner;
  static inline volatile sig_atomic_t armed = 0;
  static inline struct sigaction old_segv, old_bus;
  stack_t old_alt{};
  bool installed = false;

  static void handler(int sig, siginfo_t* info, void*) {
    Sim& s = S();
    Fiber* f = s.cur;
    if (!armed || f == nullptr || !pthread_equal(pthread_self(), owner)) {
      sigaction(sig, sig == SIGSEGV ? &old_segv : &old_bus, nullptr);
      return;  // the faulting instruction runs again and goes to the previous handler
    }
    const auto a = reinterpret_cast<uintptr_t>(info->si_addr);
    const auto lo = reinterpret_cast<uintptr_t>(f->stack);
    if (a < lo && a + kGuardBytes >= lo) {
      snprintf(s.fault_msg, sizeof s.fault_msg,
               "stack overflow (the simulator gives each thread %zu KiB of stack; deep recursion "
               "or large local arrays?)",
               kStackBytes / 1024);
    } else {
      snprintf(s.fault_msg, sizeof s.fault_msg,
               "%s at address %p: an invalid memory access outside cbam::ld/st (a raw pointer "
               "dereference or a shared-memory index far out of range?)",
               sig == SIGSEGV ? "segmentation fault" : "bus error", info->si_addr);
    }
    s.fault = 1;
    f->state = FState::Done;
    f->op = Op::None;
    Ctx dead;
    ctx_switch(&dead, &s.sched_ctx);  // never returns here
  }

  FaultGuard() {
    if (!alt) alt = static_cast<char*>(std::malloc(kAltStack));
    if (!alt) return;
    stack_t ss{};
    ss.ss_sp = alt;
    ss.ss_size = kAltStack;
    ss.ss_flags = 0;
    if (sigaltstack(&ss, &old_alt) != 0) return;
    struct sigaction sa {};
    sa.sa_sigaction = &handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
    owner = pthread_self();
    armed = 1;
    installed = true;
  }
  ~FaultGuard() {
    if (!installed) return;
    armed = 0;
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaltstack(&old_alt, nullptr);
  }
};

// Blocks the running fiber until the scheduler resumes it; unwinds it when its block is abandoned.
void wait_here(Fiber* f) {
  Sim& s = S();
  f->state = FState::Waiting;
  ctx_switch(&f->ctx, &s.sched_ctx);
  if (f->abort && std::uncaught_exceptions() == 0) throw FiberAbort{};
}

Fiber* running(const char* what) {
  Fiber* f = S().cur;
  TORCH_CHECK(f != nullptr && t_in_launch, "cbam simulator: ", what,
              " called outside a kernel launched with cbam::launch");
  return f;
}

bool is_warp_op(Op op) { return op != Op::None && op != Op::SyncThreads; }

// The value lane `src` of the warp holds for the collective, or poison if that lane does not exist
// or has exited.
void lane_value(Fiber* warp, int n_lanes, int src, unsigned size, unsigned char* out) {
  if (src < 0 || src >= n_lanes || warp[src].state == FState::Done) {
    std::memset(out, kPoison, size);
    return;
  }
  std::memcpy(out, warp[src].value, size);
}

// Completes the collective of one warp whose live lanes all wait at the same warp op.
void complete_warp(Fiber* warp, int n_lanes) {
  uint32_t ballot = 0;
  int n_live = 0, n_true = 0;
  for (int l = 0; l < n_lanes; ++l) {
    if (warp[l].state == FState::Done) continue;
    ++n_live;
    if (warp[l].arg) {
      ++n_true;
      ballot |= 1u << l;
    }
  }
  unsigned char tmp[32][8];
  for (int l = 0; l < n_lanes; ++l) {
    Fiber& f = warp[l];
    if (f.state == FState::Done) continue;
    const int w = f.width;
    const int seg_lo = l & ~(w - 1);
    const int seg_hi = seg_lo + w - 1;
    // PTX shfl.sync: only the low 5 bits of the lane / delta / lane mask operand count
    const int b = f.arg & 31;
    int src = l;
    switch (f.op) {
      case Op::ShflIdx: src = seg_lo + (b & (w - 1)); break;
      case Op::ShflUp: src = l - b < seg_lo ? l : l - b; break;
      case Op::ShflDown: src = l + b > seg_hi ? l : l + b; break;
      case Op::ShflXor: src = (l ^ b) > seg_hi ? l : (l ^ b); break;
      case Op::Ballot: f.result = ballot; break;
      case Op::Any: f.result = n_true > 0; break;
      case Op::All: f.result = n_true == n_live; break;
      default: break;
    }
    if (f.size) lane_value(warp, n_lanes, src, f.size, tmp[l]);
  }
  for (int l = 0; l < n_lanes; ++l) {
    Fiber& f = warp[l];
    if (f.state == FState::Done) continue;
    if (f.size) std::memcpy(f.value, tmp[l], f.size);
  }
}

// A description of where each live thread of the block waits, for deadlock messages.
std::string describe_block(int n) {
  Sim& s = S();
  std::map<std::string, std::vector<int>> groups;
  std::vector<int> done;
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    if (f.state == FState::Done) {
      done.push_back(i);
      continue;
    }
    groups[std::string(op_name(f.op)) + " at " + site_str(f.site)].push_back(i);
  }
  std::ostringstream o;
  for (auto& [where, ids] : groups) o << "\n  threads " << ranges(ids) << " wait at " << where;
  if (!done.empty()) o << "\n  threads " << ranges(done) << " have exited";
  o << "\n  (threads by linear id x + y*blockDim.x + z*blockDim.x*blockDim.y)";
  return o.str();
}

// Called when no fiber can run. Releases what can be released into s.ready; returns false when
// the block has finished or is deadlocked (the latter records an error).
bool resolve(int n) {
  Sim& s = S();
  bool progress = false;
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int lanes = std::min(32, n - w0);
    Fiber* warp = &s.fibers[w0];
    int live = 0, at_warp = 0, first = -1;
    for (int l = 0; l < lanes; ++l) {
      if (warp[l].state == FState::Done) continue;
      ++live;
      if (warp[l].state == FState::Waiting && is_warp_op(warp[l].op)) {
        ++at_warp;
        if (first < 0) first = l;
      }
    }
    if (live == 0 || at_warp != live) continue;
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = warp[l];
      if (f.state == FState::Done) continue;
      // As on sm_70+, lanes may reach a warp collective from different call sites, but all
      // must perform the same operation (shfl mode, vote mode, value size).
      if (f.op != warp[first].op || f.size != warp[first].size) {
        std::ostringstream o;
        o << "divergent warp collective in warp " << w0 / 32
          << ": its live lanes wait at different warp operations (every live lane of a warp "
             "must perform the same one):";
        std::map<std::string, std::vector<int>> groups;
        for (int k = 0; k < lanes; ++k) {
          if (warp[k].state == FState::Done) continue;
          groups[std::string(op_name(warp[k].op)) + " at " + site_str(warp[k].site)].push_back(
              w0 + k);
        }
        for (auto& [where, ids] : groups) o << "\n  threads " << ranges(ids) << " at " << where;
        record_error(nullptr, o.str());
        return false;
      }
    }
    complete_warp(warp, lanes);
    for (int l = 0; l < lanes; ++l) {
      if (warp[l].state == FState::Done) continue;
      warp[l].state = FState::Ready;
      s.ready.push_back(w0 + l);
    }
    progress = true;
  }
  if (progress) return true;

  int live = 0, at_sync = 0, first = -1;
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    if (f.state == FState::Done) continue;
    ++live;
    if (f.state == FState::Waiting && f.op == Op::SyncThreads) {
      ++at_sync;
      if (first < 0) first = i;
    }
  }
  if (live == 0) return false;  // the block has finished
  if (at_sync == live) {
    bool same = true;
    for (int i = 0; i < n && same; ++i) {
      Fiber& f = s.fibers[i];
      if (f.state != FState::Done && !same_site(f.site, s.fibers[first].site)) same = false;
    }
    if (!same) {
      record_error(nullptr,
                   "divergent __syncthreads: the block's live threads wait at different "
                   "__syncthreads calls (a hang or undefined behaviour on a GPU):" +
                       describe_block(n));
      return false;
    }
    for (int i = 0; i < n; ++i) {
      Fiber& f = s.fibers[i];
      if (f.state == FState::Done) continue;
      f.state = FState::Ready;
      s.ready.push_back(i);
    }
    return true;
  }
  record_error(nullptr,
               "deadlock: a barrier or warp collective that not every live thread reaches (a "
               "hang on a GPU):" +
                   describe_block(n));
  return false;
}

void order_ready() {
  Sim& s = S();
  switch (s.schedule) {
    case Schedule::Forward: std::sort(s.ready.begin(), s.ready.end()); break;
    case Schedule::Reverse: std::sort(s.ready.rbegin(), s.ready.rend()); break;
    case Schedule::Shuffle: std::shuffle(s.ready.begin(), s.ready.end(), s.rng); break;
  }
}

// Unwinds every started fiber of the block after an error.
void abandon_block(int n) {
  Sim& s = S();
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    if (f.state == FState::Fresh) {
      f.state = FState::Done;
    } else if (f.state != FState::Done) {
      f.abort = true;
      resume(&f);
      if (f.state != FState::Done) {  // kernel code swallowed the abort and waits again
        f.state = FState::Done;       // abandon its stack (it is reused by the next block)
      }
    }
  }
}

void run_block(const dim3& block, size_t smem_bytes) {
  Sim& s = S();
  const int n = s.n_threads;
  std::memset(s.smem, kPoison, smem_bytes);
  poison_static_shared();
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.state = FState::Fresh;
    f.abort = false;
    f.op = Op::None;
    f.synced = false;
    f.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    ctx_start(f);
  }
  s.ready.clear();
  for (int i = 0; i < n; ++i) s.ready.push_back(i);
  std::vector<int> batch;
  for (;;) {
    order_ready();
    batch.swap(s.ready);
    s.ready.clear();
    for (int id : batch) {
      resume(&s.fibers[id]);
      if (s.has_error) {
        abandon_block(n);
        return;
      }
    }
    if (!resolve(n)) {
      if (s.has_error) abandon_block(n);
      return;
    }
  }
}

void validate_launch(const char* name, const void* kernel, dim3 grid, dim3 block,
                     size_t smem_bytes) {
  Sim& s = S();
  auto bad = [&](const std::string& why) {
    TORCH_CHECK(false, "cbam simulator: invalid launch of kernel '", name, "' with grid ",
                dim_str(grid.x, grid.y, grid.z), ", block ", dim_str(block.x, block.y, block.z),
                ", ", smem_bytes, " bytes of dynamic shared memory: ", why,
                " (cudaErrorInvalidConfiguration / cudaErrorInvalidValue on a GPU)");
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) bad("a grid dimension is 0");
  if (block.x == 0 || block.y == 0 || block.z == 0) bad("a block dimension is 0");
  if (grid.x > 2147483647u) bad("grid.x exceeds 2^31-1");
  if (grid.y > 65535u) bad("grid.y exceeds 65535");
  if (grid.z > 65535u) bad("grid.z exceeds 65535");
  if (block.x > 1024u) bad("block.x exceeds 1024");
  if (block.y > 1024u) bad("block.y exceeds 1024");
  if (block.z > 64u) bad("block.z exceeds 64");
  if (static_cast<uint64_t>(block.x) * block.y * block.z > 1024u)
    bad("more than 1024 threads per block");
  long long limit = kDefaultSmem;
  auto it = s.smem_limit.find(kernel);
  if (it != s.smem_limit.end()) limit = it->second;
  if (smem_bytes > static_cast<unsigned long long>(limit)) {
    std::ostringstream o;
    o << "dynamic shared memory exceeds the kernel's limit of " << limit << " bytes"
      << (limit == kDefaultSmem ? " (48 KiB unless raised with cbam::set_max_dynamic_smem)" : "");
    bad(o.str());
  }
}

}  // namespace

// ------------------------------------------------------------------------ called from kernels
void sync_threads(const Site& site) {
  Fiber* f = running("__syncthreads");
  f->op = Op::SyncThreads;
  f->site = site;
  wait_here(f);
}

uint32_t warp_op(Op op, uint32_t mask, void* value, unsigned size, int arg, int width,
                 const Site& site) {
  Fiber* f = running(op_name(op));
  TORCH_CHECK(mask == 0xffffffffu, op_name(op), " at ", site_str(site), ": mask 0x", std::hex,
              mask, std::dec,
              " is not supported; the kernel dialect allows only the full mask 0xffffffff");
  TORCH_CHECK(width >= 1 && width <= 32 && (width & (width - 1)) == 0, op_name(op), " at ",
              site_str(site), ": width ", width, " is not a power of two between 1 and 32");
  TORCH_CHECK(size <= sizeof(f->value), "cbam simulator: warp value too large");
  f->op = op;
  f->site = site;
  f->mask = mask;
  f->arg = arg;
  f->width = width;
  f->size = size;
  if (size) std::memcpy(f->value, value, size);
  wait_here(f);
  if (size) std::memcpy(value, f->value, size);
  return f->result;
}

void unsynced_error(const void* p, bool write, const char* what) {
  std::ostringstream o;
  o << "global " << what << " at 0x" << std::hex << reinterpret_cast<uintptr_t>(p) << std::dec
    << " before cbam::grid_dependency_sync(): every kernel calls it first, before it "
    << (write ? "writes" : "reads")
    << " global memory (on a GPU, under programmatic dependent launch, the kernel before it in "
       "the stream may still be running until then)";
  TORCH_CHECK(false, o.str());
}

void grid_dependency_sync() {
  Sim& s = S();
  TORCH_CHECK(s.cur != nullptr, "cbam::grid_dependency_sync() outside a kernel");
  s.cur->synced = true;
}

void access_error(const void* p, size_t bytes, size_t align, bool write, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::ostringstream o;
  o << "global " << what << " of " << bytes << " bytes at 0x" << std::hex << a << std::dec;
  if ((a & (align - 1)) != 0) {
    o << " is misaligned: the address must be a multiple of " << align << " (address % " << align
      << " = " << (a & (align - 1)) << "); a GPU faults on it";
    TORCH_CHECK(false, o.str());
  }
  bool in_readonly = false;
  for (size_t i = 0; i < g_mem.n_regions; ++i) {
    const Region& r = g_mem.regions[i];
    if (a >= r.lo && a + bytes <= r.hi) in_readonly = true;
  }
  if (in_readonly) {
    o << " writes into a tensor handed to the launch as const (cbam::global_ptr<const T>)";
    TORCH_CHECK(false, o.str());
  }
  o << " is out of bounds: not inside any tensor handed to cbam::global_ptr for this launch";
  const auto sm = reinterpret_cast<uintptr_t>(S().smem);
  if ((a < sm + sizeof(S().smem) && a + bytes > sm) || in_static_shared(p, bytes)) {
    o << " (the address is shared memory: cbam::ld/st/ld_vec/st_vec are for global memory "
         "only; index shared arrays directly)";
    TORCH_CHECK(false, o.str());
  }
  // the nearest tensor, to help find the faulty index
  const Region* best = nullptr;
  uintptr_t best_d = UINTPTR_MAX;
  for (size_t i = 0; i < g_mem.n_regions; ++i) {
    const Region& r = g_mem.regions[i];
    const uintptr_t d = a < r.lo ? r.lo - a : (a + bytes > r.hi ? a + bytes - r.hi : 0);
    if (d < best_d) {
      best_d = d;
      best = &r;
    }
  }
  if (best) {
    o << " (nearest tensor: [0x" << std::hex << best->lo << ", 0x" << best->hi << std::dec
      << "), " << (best->hi - best->lo) << " bytes; the access starts at byte offset "
      << static_cast<long long>(a - best->lo) << ")";
  } else {
    o << " (the launch has no tensors)";
  }
  TORCH_CHECK(false, o.str());
}

void register_region(const at::Tensor& t, bool writable, c10::ScalarType expected) {
  TORCH_CHECK(t.defined(), "cbam::global_ptr: undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "cbam::global_ptr (simulator): the tensor is on ", t.device(),
              "; the simulator runs kernels on CPU tensors");
  TORCH_CHECK(expected == c10::ScalarType::Undefined || expected == t.scalar_type(),
              "cbam::global_ptr<", c10::toString(expected), ">: the tensor's dtype is ",
              t.scalar_type());
  if (t.numel() == 0) return;
  int64_t last = 0;  // offset of the last element, in elements
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) >= 0, "cbam::global_ptr: negative strides are not supported");
    last += (t.size(d) - 1) * t.stride(d);
  }
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  t_pending.push_back(
      Pending{Region{lo, lo + static_cast<uintptr_t>((last + 1) * t.element_size()), writable},
              t.storage().getWeakStorageImpl()});
}

// ------------------------------------------------------------------------------ the L2 model
namespace {

constexpr uint64_t kSectorBytes = 32;

struct L2Model {
  uint64_t capacity_sectors = 0;
  int sms = 0, threads_per_sm = 0;
  std::list<uint64_t> lru;  // resident sectors (address / 32), most recently used first
  std::unordered_map<uint64_t, std::list<uint64_t>::iterator> where;
  // the running launch: each block's accesses in the order its threads ran, as sector * 2 +
  // (1 for a store), in the order the blocks ran
  std::vector<std::vector<uint64_t>> logs;
};

L2Model& L2() {
  static L2Model* m = new L2Model();
  return *m;
}

// The modelled SMs while the model is on, else 0: read by num_sms() from the launchers (host
// code, outside the simulator's lock), written by set_l2_model under it.
std::atomic<int> g_model_sms{0};

// One access to a sector: resident, it becomes the most recently used; absent, a load fetches it
// (l2_miss_bytes), a store allocates it, and the least recently used sector leaves.
void l2_touch(L2Model& m, uint64_t entry) {
  const uint64_t sector = entry >> 1;
  auto it = m.where.find(sector);
  if (it != m.where.end()) {
    m.lru.splice(m.lru.begin(), m.lru, it->second);
    return;
  }
  if ((entry & 1) == 0) g_mem.l2_miss_bytes += kSectorBytes;
  m.lru.push_front(sector);
  m.where.emplace(sector, m.lru.begin());
  if (m.lru.size() > m.capacity_sectors) {
    m.where.erase(m.lru.back());
    m.lru.pop_back();
  }
}

// Blocks resident at once on the modelled GPU: the SMs times the blocks an SM holds by its
// threads (at most 32) and shared memory (228 KiB an SM, 1 KiB of it reserved a block; smem_bytes:
// the dynamic bytes and the static ones the simulator found in the kernel function). Registers
// may hold fewer; the model does not know them.
size_t l2_resident_blocks(const L2Model& m, const dim3& block, size_t smem_bytes) {
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  long long per_sm = std::min<long long>(32, m.threads_per_sm / threads);
  per_sm = std::min<long long>(per_sm, (228 * 1024) / (static_cast<long long>(smem_bytes) + 1024));
  return static_cast<size_t>(std::max<long long>(1, per_sm) * m.sms);
}

// The launch's accesses, replayed as a GPU interleaves them: the first `slots` blocks (in the
// order the simulator ran them) start together and take one access each in turn; a block that
// finishes hands its slot to the next one.
void l2_replay(L2Model& m, size_t slots) {
  std::vector<size_t> active, pos;
  size_t next = 0;
  while (active.size() < slots && next < m.logs.size()) {
    active.push_back(next++);
    pos.push_back(0);
  }
  while (!active.empty()) {
    for (size_t i = 0; i < active.size();) {
      const std::vector<uint64_t>& log = m.logs[active[i]];
      if (pos[i] < log.size()) {
        l2_touch(m, log[pos[i]++]);
        ++i;
      } else if (next < m.logs.size()) {
        active[i] = next++;
        pos[i] = 0;
      } else {
        active.erase(active.begin() + static_cast<std::ptrdiff_t>(i));
        pos.erase(pos.begin() + static_cast<std::ptrdiff_t>(i));
      }
    }
  }
  m.logs.clear();
}

}  // namespace

void l2_access(uintptr_t a, size_t bytes, bool write) {
  std::vector<uint64_t>& log = L2().logs.back();
  const uint64_t last = (static_cast<uint64_t>(a) + bytes - 1) / kSectorBytes;
  for (uint64_t sector = static_cast<uint64_t>(a) / kSectorBytes; sector <= last; ++sector) {
    log.push_back(sector * 2 + (write ? 1 : 0));
  }
}

void set_l2_model(uint64_t capacity_bytes, int64_t sms, int64_t threads_per_sm) {
  TORCH_CHECK(capacity_bytes == 0 || capacity_bytes >= kSectorBytes,
              "set_l2_model: capacity_bytes must be 0 (off) or at least one 32-byte sector, got ",
              capacity_bytes);
  TORCH_CHECK(sms >= 1 && sms <= 4096, "set_l2_model: sms must be in [1, 4096], got ", sms);
  TORCH_CHECK(threads_per_sm >= 32 && threads_per_sm <= 4096,
              "set_l2_model: threads_per_sm must be in [32, 4096], got ", threads_per_sm);
  Sim& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  L2Model& m = L2();
  m.lru.clear();
  m.where.clear();
  m.logs.clear();
  m.capacity_sectors = capacity_bytes / kSectorBytes;
  m.sms = static_cast<int>(sms);
  m.threads_per_sm = static_cast<int>(threads_per_sm);
  g_mem.l2_on = capacity_bytes != 0;
  g_model_sms.store(g_mem.l2_on ? m.sms : 0);
}

uint64_t l2_model_capacity() {
  Sim& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  return g_mem.l2_on ? L2().capacity_sectors * kSectorBytes : 0;
}

// ------------------------------------------------------------------------------------ launch
void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem_bytes,
              KernelBody body) {
  TORCH_CHECK(!t_in_launch, "cbam simulator: cbam::launch of '", name,
              "' from inside a running kernel");
  // The tensors of this launch: those registered since the previous launch, else the previous
  // launch's.
  if (!t_pending.empty()) {
    t_last.clear();
    for (const Pending& p : t_pending) {
      if (!p.storage.expired()) t_last.push_back(p.region);
    }
    t_pending.clear();
  }
  Sim& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  validate_launch(name, kernel, grid, block, smem_bytes);
  select_static_shared(kernel);
  if (g_mem.l2_on) L2().logs.clear();  // (a launch that threw before its replay left some)
  const int n = static_cast<int>(block.x * block.y * block.z);
  ensure_stacks(n);
  s.n_threads = n;
  s.body = body;
  s.has_error = false;
  s.error.clear();
  g_gridDim = grid;
  g_blockDim = block;
  for (const Region& r : t_last) r.first = 0;
  g_mem.regions = t_last.data();
  g_mem.n_regions = t_last.size();
  g_mem.bytes_read = 0;
  g_mem.bytes_written = 0;
  g_mem.bytes_vec = 0;
  g_mem.bytes_vec8 = 0;
  g_mem.l2_miss_bytes = 0;
  uint3 failed{0, 0, 0};
  {
    struct InLaunch {  // reset even if the loop below throws
      InLaunch() { t_in_launch = true; }
      ~InLaunch() {
        t_in_launch = false;
        S().cur = nullptr;
        g_mem.regions = nullptr;
        g_mem.n_regions = 0;
      }
    } in_launch;
    FaultGuard fault_guard;
    // The blocks in the schedule's order: which block of a group finishes last (the last-block
    // combine of kernels/combine_partials.cuh) must not change a result.
    const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
    std::vector<uint64_t> order;
    if (s.schedule == Schedule::Shuffle) {
      order.resize(nblocks);
      for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
      std::shuffle(order.begin(), order.end(), s.rng);
    }
    for (uint64_t i = 0; i < nblocks && !s.has_error; ++i) {
      const uint64_t b = s.schedule == Schedule::Forward   ? i
                         : s.schedule == Schedule::Reverse ? nblocks - 1 - i
                                                           : order[i];
      g_blockIdx = uint3{static_cast<unsigned>(b % grid.x),
                         static_cast<unsigned>(b / grid.x % grid.y),
                         static_cast<unsigned>(b / grid.x / grid.y)};
      if (g_mem.l2_on) L2().logs.emplace_back();
      run_block(block, smem_bytes);
      if (s.has_error) failed = g_blockIdx;
    }
  }
  if (g_mem.l2_on) {  // (a launch that failed touched nothing: its logs go)
    if (s.has_error) L2().logs.clear();
    else {
      unsigned long static_bytes = 0, count = 0;
      selected_static_shared_info(&static_bytes, &count);
      l2_replay(L2(), l2_resident_blocks(L2(), block, smem_bytes + static_bytes));
    }
  }
  if (s.has_error) {
    const std::string err = s.error;
    s.has_error = false;
    TORCH_CHECK(false, "cbam simulator: kernel '", name, "' block ",
                dim_str(failed.x, failed.y, failed.z), " ", err);
  }
  s.stats.push_back(LaunchStat{name, reinterpret_cast<uintptr_t>(kernel), grid, block,
                               smem_bytes, g_mem.bytes_read, g_mem.bytes_written,
                               g_mem.bytes_vec, g_mem.bytes_vec8, t_last, g_mem.l2_on,
                               g_mem.l2_miss_bytes, pdl_mode == 1});
}

void set_max_dynamic_smem(const void* kernel, long long bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= kMaxSmem, "cbam::set_max_dynamic_smem: ", bytes,
              " bytes is outside [0, ", kMaxSmem,
              "] (227 KiB, the most a block may have; cudaErrorInvalidValue on a GPU)");
  Sim& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  s.smem_limit[kernel] = bytes;
}

void* dynamic_smem() { return S().smem; }

void set_schedule(Schedule sched, uint64_t seed) {
  Sim& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  s.schedule = sched;
  s.seed = seed;
  s.rng.seed(seed);
}
Schedule schedule() { return S().schedule; }
uint64_t schedule_seed() { return S().seed; }

std::vector<LaunchStat> launch_stats() {
  Sim& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.stats;
}
void clear_launch_stats() {
  Sim& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  s.stats.clear();
}

}  // namespace sim

// 132 (an H100's or H200's); under the L2 model, its SMs: the launchers size their grids for the
// GPU the model stands for (a case scaled down with its SMs keeps its waves).
int num_sms() {
  const int sms = sim::g_model_sms.load();
  return sms > 0 ? sms : 132;
}

namespace {
std::atomic<bool> g_capturing{false};
}  // namespace
bool stream_capturing() { return g_capturing.load(); }
void sim::set_capturing(bool on) { g_capturing.store(on); }

}  // namespace cbam
