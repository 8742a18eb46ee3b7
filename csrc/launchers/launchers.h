// Host launchers of the CBAM kernels: shape checks, dtype dispatch, grid sizing, output allocation.
// Written once, compiled by nvcc into cbam_fused._C and by g++ (-DCBAM_SIMULATOR) into
// cbam_fused._sim. Each function has the signature of its op in csrc/ops.cpp.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace cbam {}  // namespace cbam
