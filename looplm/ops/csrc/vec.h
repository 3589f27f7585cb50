// Small vector helpers shared by the decoding kernels (linear_small.cpp, layer_step.cpp).
#pragma once

#include <cstdint>

namespace looplm {

// sum_i a[i] b[i] in 16 independent lanes, so the compiler vectorises it without reassociating.
inline float dot(const float* a, const float* b, int64_t k) {
  constexpr int L = 16;
  float acc[L] = {0};
  int64_t i = 0;
  for (; i + L <= k; i += L) {
    for (int l = 0; l < L; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float s = 0;
  for (int l = 0; l < L; ++l) s += acc[l];
  for (; i < k; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace looplm
