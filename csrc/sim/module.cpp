// cbam_fused._sim: the Python face of the SIMT simulator (schedules, launch statistics) and its
// self-test kernels. The simulator builds of the CBAM ops register themselves separately as
// torch.ops.cbam_fused_sim.* (csrc/sim/kernels_sim.cpp); this is the one PYBIND11_MODULE of _sim.
#include <torch/extension.h>

#include "dialect/dialect.cuh"
#include "sim/selftest_kernels.cuh"
#include "sim/shared_poison.h"

namespace {

// Simulator-only self tests (not dialect kernels: they do what the dialect forbids on purpose).
namespace simonly {

CBAM_DEVICE float deep(int n, float v) {
  volatile float frame[512];
  frame[0] = v;
  frame[511] = v;
  if (n == 0) return frame[0];
  return deep(n - 1, v + 1.0f) + frame[511];
}

// mode 0: recursion deep enough to overflow the fiber stack (thread 3 only)
// mode 1: a raw store through a wild pointer (thread 3 only)
// mode 2 / 3: cbam::ld on static / dynamic shared memory (an error: ld/st are for global memory)
CBAM_GLOBAL void fault_kernel(float* __restrict__ out, int mode, int64_t addr) {
  cbam::grid_dependency_sync();
  __shared__ float buf[64];
  CBAM_DYNAMIC_SMEM(float, dyn);
  buf[threadIdx.x] = 1.0f;
  float v = 0.0f;
  if (threadIdx.x == 3) {
    if (mode == 0) {
      v = deep(100000, 1.0f);
    } else if (mode == 1) {
      *reinterpret_cast<volatile float*>(static_cast<uintptr_t>(addr)) = 1.0f;
    } else if (mode == 2) {
      v = cbam::ld(buf + 5);
    } else {
      v = cbam::ld(dyn + 5);
    }
  }
  __syncthreads();
  cbam::st(out + threadIdx.x, v);
}

at::Tensor fault(int64_t mode, int64_t addr) {
  at::Tensor out = at::zeros({64});
  cbam::launch("selftest_fault", &fault_kernel, dim3(1), dim3(64), 256, cbam::global_ptr<float>(out),
               static_cast<int>(mode), addr);
  return out;
}

// cbam::global_ptr<float> on t (checks the dtype and the device); registers nothing for later:
// the pending region is dropped when t dies before a launch.
void global_ptr_float(const at::Tensor& t) { (void)cbam::global_ptr<float>(t); }

}  // namespace simonly

cbam::sim::Schedule parse_schedule(const std::string& kind) {
  if (kind == "forward") return cbam::sim::Schedule::Forward;
  if (kind == "reverse") return cbam::sim::Schedule::Reverse;
  if (kind == "shuffle") return cbam::sim::Schedule::Shuffle;
  throw py::value_error("schedule must be 'forward', 'reverse' or 'shuffle', got '" + kind + "'");
}

const char* schedule_name(cbam::sim::Schedule s) {
  switch (s) {
    case cbam::sim::Schedule::Forward: return "forward";
    case cbam::sim::Schedule::Reverse: return "reverse";
    case cbam::sim::Schedule::Shuffle: return "shuffle";
  }
  return "?";
}

py::tuple dims(const dim3& d) { return py::make_tuple(d.x, d.y, d.z); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SIMT simulator of cbam_fused: CUDA kernel sources compiled by g++, run on the CPU";

  m.def(
      "set_schedule",
      [](const std::string& kind, uint64_t seed) {
        cbam::sim::set_schedule(parse_schedule(kind), seed);
      },
      py::arg("kind"), py::arg("seed") = 0,
      "Order of fibers between synchronisation points: 'forward', 'reverse' or 'shuffle' "
      "(seeded; the generator is reseeded here).");
  m.def(
      "get_schedule",
      []() {
        return py::make_tuple(schedule_name(cbam::sim::schedule()), cbam::sim::schedule_seed());
      },
      "The current (kind, seed).");
  m.def(
      "launch_stats",
      []() {
        py::list out;
        for (const auto& s : cbam::sim::launch_stats()) {
          py::dict d;
          d["name"] = s.name;
          d["kernel"] = s.kernel;
          d["grid"] = dims(s.grid);
          d["block"] = dims(s.block);
          d["smem_bytes"] = s.smem_bytes;
          d["bytes_read"] = s.bytes_read;
          d["bytes_written"] = s.bytes_written;
          d["bytes_vec"] = s.bytes_vec;
          d["bytes_vec8"] = s.bytes_vec8;
          py::list regions;
          for (const auto& r : s.regions) regions.append(py::make_tuple(r.lo, r.hi, r.first));
          d["regions"] = regions;
          d["l2_miss_bytes"] = s.l2_on ? py::object(py::int_(s.l2_miss_bytes)) : py::none();
          d["pdl"] = s.pdl;
          out.append(d);
        }
        return out;
      },
      "One dict per completed launch since the last clear_launch_stats(): name, kernel (an id "
      "of the kernel function: which template instance ran), grid, block, "
      "smem_bytes (dynamic shared memory), bytes_read, bytes_written (global memory), "
      "bytes_vec (of those, the bytes of 16-byte accesses), bytes_vec8 (and of 8-byte vector "
      "accesses), regions (the memory of the launch's tensors as (lo, hi, first) addresses, "
      "first the launch's first access to it, in the order the blocks ran; 0 if none), "
      "l2_miss_bytes (the bytes its loads fetched from DRAM under the L2 model; None when the "
      "model is off), pdl (launched under set_pdl(1): programmatic dependent launch on a GPU).");
  m.def("clear_launch_stats", &cbam::sim::clear_launch_stats);
  m.def("set_l2_model", &cbam::sim::set_l2_model, py::arg("capacity_bytes"),
        py::arg("sms") = 132, py::arg("threads_per_sm") = 2048,
        "Empties the L2 model and gives it capacity_bytes (0: off). A traffic model only: fully "
        "associative LRU over 32-byte sectors, stores allocate without a fetch, each launch "
        "replayed with as many blocks at once as sms SMs of threads_per_sm threads hold (the "
        "launchers size their grids for sms SMs meanwhile), the contents kept across launches; "
        "each launch's stats then carry l2_miss_bytes.");
  m.def("l2_model_capacity", &cbam::sim::l2_model_capacity,
        "The L2 model's capacity in bytes (0: off).");
  m.def("num_launch_stats", []() { return cbam::sim::launch_stats().size(); });

  // self-test kernels (csrc/sim/selftest_kernels.cuh)
  namespace st = cbam::selftest;
  m.def("selftest_block_reduce", &st::block_reduce, py::arg("x"), py::arg("block"));
  m.def("selftest_warp_reduce", &st::warp_reduce, py::arg("x"), py::arg("block"));
  m.def("selftest_shuffle", &st::shuffle, py::arg("x"), py::arg("mode"), py::arg("arg"),
        py::arg("width"), py::arg("grid"), py::arg("block"), py::arg("n_live"));
  m.def("selftest_vote", &st::vote, py::arg("x"), py::arg("block"), py::arg("n_live"));
  m.def("selftest_neighbour", &st::neighbour, py::arg("x"), py::arg("block"), py::arg("sync"));
  m.def("selftest_barrier", &st::barrier, py::arg("x"), py::arg("mode"));
  m.def("selftest_access", &st::access, py::arg("x"), py::arg("mode"), py::arg("offset"));
  m.def("selftest_copy", &st::copy, py::arg("x"), py::arg("blocks"), py::arg("threads"));
  m.def("selftest_reread", &st::reread, py::arg("x"), py::arg("blocks"), py::arg("threads"));
  m.def("selftest_config", &st::config, py::arg("out"), py::arg("grid"), py::arg("block"),
        py::arg("smem"), py::arg("raise_to"));
  m.def("selftest_smem_leak", &st::smem_leak, py::arg("out_static"), py::arg("out_dynamic"),
        py::arg("threads"));
  m.def("selftest_block_order", &st::block_order, py::arg("counter"), py::arg("grid"),
        py::arg("threads"));
  m.def(
      "set_capturing", [](bool on) { cbam::sim::set_capturing(on); }, py::arg("on"),
      "Whether cbam::stream_capturing() says true: the launchers then take their CUDA-graph path "
      "(tests only).");
  m.def("selftest_barrier_loop", &st::barrier_loop, py::arg("out"), py::arg("threads"),
        py::arg("iters"));
  m.def("selftest_fault", &simonly::fault, py::arg("mode"), py::arg("addr") = 16,
        "Simulator-only: a kernel whose thread 3 overflows its stack (mode 0) or stores through "
        "a wild pointer (mode 1); the launch must raise, not crash.");
  m.def("selftest_global_ptr_float", &simonly::global_ptr_float, py::arg("t"),
        "Simulator-only: cbam::global_ptr<float>(t), for the tests of its checks.");
  m.def(
      "last_static_shared",
      []() {
        unsigned long bytes = 0, count = 0;
        cbam::sim::selected_static_shared_info(&bytes, &count);
        return py::make_tuple(bytes, count);
      },
      "(bytes, count) of the static __shared__ variables of the most recently launched kernel "
      "that the simulator found and poisons before each block (those declared in the kernel "
      "function itself).");
  m.def(
      "selftest_static_shared",
      []() {
        unsigned long bytes = 0, count = 0;
        cbam::sim::static_shared_info(
            reinterpret_cast<const void*>(&cbam::selftest::smem_leak_kernel), &bytes, &count);
        return py::make_tuple(bytes, count);
      },
      "(bytes, count) of the static __shared__ variables the simulator poisons for "
      "smem_leak_kernel (expects (1024, 1)).");
}
