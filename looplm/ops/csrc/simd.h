// ATen's Vectorized<float> at the widest instruction set this compiler targets (-march=native):
// include this before any other header. ATen picks its vector implementation from these macros;
// its exp() is Sleef's, which libtorch_cpu exports.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#endif

#include <ATen/cpu/vec/vec.h>

namespace looplm {

using Vec = at::vec::Vectorized<float>;

// sigmoid(x) = 1 / (1 + exp(-x)), lane-wise
inline Vec sigmoid(const Vec& x) { return Vec(1.0f) / (Vec(1.0f) + x.neg().exp()); }

// out[j] = silu(gate[j]) * up[j] * w for j < n (SwiGLU's activation), a vector at a time with the
// last one partial, so an element's result does not depend on n or on where a range of it starts.
inline void silu_mul(const float* gate, const float* up, float w, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int m = static_cast<int>(n - j < Vec::size() ? n - j : Vec::size());
    const Vec g = Vec::loadu(gate + j, m);
    (g * sigmoid(g) * Vec::loadu(up + j, m) * Vec(w)).store(out + j, m);
  }
}

}  // namespace looplm
