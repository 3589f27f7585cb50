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

}  // namespace looplm
