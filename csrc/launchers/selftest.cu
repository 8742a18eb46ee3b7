// The simulator's self-test kernels (csrc/sim/selftest_kernels.cuh) compiled by nvcc: proves in
// every CUDA build (CI: sm_80 and sm_90) that the kernel dialect and its launch helpers compile
// under nvcc too. Not registered as ops; the table below only makes nvcc instantiate and emit
// every launcher and kernel.
#include "sim/selftest_kernels.cuh"

namespace cbam {
namespace selftest {

// Referenced so that every launcher (and through it every kernel instantiation) is compiled.
extern const void* const kLaunchers[];
const void* const kLaunchers[] = {
    reinterpret_cast<const void*>(&block_reduce),
    reinterpret_cast<const void*>(&warp_reduce),
    reinterpret_cast<const void*>(&shuffle),
    reinterpret_cast<const void*>(&vote),
    reinterpret_cast<const void*>(&neighbour),
    reinterpret_cast<const void*>(&barrier),
    reinterpret_cast<const void*>(&access),
    reinterpret_cast<const void*>(&copy),
    reinterpret_cast<const void*>(&config),
    reinterpret_cast<const void*>(&smem_leak),
    reinterpret_cast<const void*>(&barrier_loop),
    reinterpret_cast<const void*>(&block_order),
    reinterpret_cast<const void*>(&reread),
};

}  // namespace selftest
}  // namespace cbam
