// The CUDA kernels' launchers built for the SIMT simulator: the very same launcher and kernel
// sources as the CUDA build (csrc/launchers/*.cu, csrc/kernels/*.cuh), compiled here by g++ with
// -DCBAM_SIMULATOR, registered as torch.ops.cbam_fused_sim.* (the schemas of csrc/ops.cpp) for CPU
// tensors. cbam_fused.testing.use_simulator() routes the cbam_fused ops' CPU kernels here.
#include <torch/library.h>

#include "launchers/backward_reduce.cu"
#include "launchers/elementwise.cu"
#include "launchers/pool.cu"

TORCH_LIBRARY(cbam_fused_sim, m) {
  m.def("pool_over_s(Tensor x, Tensor? scale) -> (Tensor avg, Tensor max, Tensor argmax)");
  m.def("pool_over_c(Tensor x, Tensor? scale) -> (Tensor avg, Tensor max, Tensor argmax)");
  m.def("apply_gates(Tensor x, Tensor? gc, Tensor? gs) -> Tensor");
  m.def(
      "backward_reduce(Tensor grad, Tensor x, Tensor? gc, Tensor? gs, bool need_rc, "
      "bool need_rs) -> (Tensor rc, Tensor rs)");
  m.def(
      "pool_over_c_backward_scale(Tensor x, Tensor? d_avg, Tensor? d_max, Tensor? argmax) -> "
      "Tensor");
  m.def(
      "pool_over_s_backward_scale(Tensor x, Tensor? d_avg, Tensor? d_max, Tensor? argmax) -> "
      "Tensor");
  m.def(
      "grad_input(Tensor grad, Tensor? gc, Tensor? gs, Tensor? da, Tensor? dm, Tensor? idx_s, "
      "Tensor? du, Tensor? dv, Tensor? idx_c, int arrangement) -> Tensor");
  // Test knobs of the launchers (csrc/launchers/launchers.h, cbam::debug).
  m.def("set_debug(bool poison_outputs, int tile_mode) -> ()", &cbam::set_debug);
}

TORCH_LIBRARY_IMPL(cbam_fused_sim, CPU, m) {
  m.impl("pool_over_s", &cbam::pool_over_s);
  m.impl("pool_over_c", &cbam::pool_over_c);
  m.impl("apply_gates", &cbam::apply_gates);
  m.impl("backward_reduce", &cbam::backward_reduce);
  m.impl("pool_over_c_backward_scale", &cbam::pool_over_c_backward_scale);
  m.impl("pool_over_s_backward_scale", &cbam::pool_over_s_backward_scale);
  m.impl("grad_input", &cbam::grad_input);
}
