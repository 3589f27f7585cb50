// Argument checks and small helpers shared by the decoding kernels (block_step.cpp, moe_step.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace looplm {

inline const float* fptr(const at::Tensor& t) { return t.data_ptr<float>(); }

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

// t must be a contiguous float32 CPU tensor of exactly this shape; `op` names the kernel.
inline void check_float(const at::Tensor& t, const char* op, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), op, ": ", name,
              " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.sizes().vec() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(shape));
}

}  // namespace looplm
