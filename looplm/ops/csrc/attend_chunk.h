// One chunk of split-K decoding attention, for attn_step.cpp's `attend`: up to 64 cached rows of one
// key head, read straight from the cache (float32 rows, or int8 codes whose per-row scales are
// folded into the scores and the softmax weights, so nothing is dequantised into a buffer), against
// the `group` query heads that share the key head. Each key or value row is loaded (and converted)
// once for up to kGroupHeads query heads:
//   scores  s_g,t = c * ks_t * (q_g . code_t)    four keys at a time
//   softmax m_g = max_t s_g,t, p_g,t = exp(s_g,t - m_g), l_g = sum_t p_g,t   whole vectors
//   values  acc_g = sum_t (p_g,t * vs_t) code_t   four vectors of D at a time
// (ks, vs: the rows' scales, 1 for float rows; c = 1/sqrt(D)). Written once over a vector of kLanes
// floats: 512-bit AVX-512 (16 lanes, four query heads per pass) or 256-bit AVX2 + FMA (8 lanes, two
// per pass: AVX2 has 16 registers). Head dimensions that are a multiple of 4 * kLanes
// (LOOPLM_ATTEND_CHUNK builds); attend keeps its portable path for others and other builds.
#pragma once

#include "simd.h"  // first: it selects ATen's vector instruction set

#include <algorithm>
#include <cstdint>
#include <limits>

#include "rows_gemm.h"

namespace looplm {
constexpr int kChunkKeys = 64;  // cached rows per chunk of the split-K decoding attention
}  // namespace looplm

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define LOOPLM_ATTEND_CHUNK 1

namespace looplm {
namespace chunk {

#if defined(__AVX512F__)
using VF = __m512;
constexpr int kLanes = 16, kGroupHeads = 4;
inline VF zero() { return _mm512_setzero_ps(); }
inline VF set1(float x) { return _mm512_set1_ps(x); }
inline VF load(const float* p) { return _mm512_loadu_ps(p); }
inline VF load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void store(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF add(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF max(VF a, VF b) { return _mm512_max_ps(a, b); }
inline float sum(VF a) { return _mm512_reduce_add_ps(a); }
inline float top(VF a) { return _mm512_reduce_max_ps(a); }
using looplm::sum4;  // rows_gemm.h's: the lane sums of four vectors
#else
using VF = __m256;
constexpr int kLanes = 8, kGroupHeads = 2;
inline VF zero() { return _mm256_setzero_ps(); }
inline VF set1(float x) { return _mm256_set1_ps(x); }
inline VF load(const float* p) { return _mm256_loadu_ps(p); }
inline VF load_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void store(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF add(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF max(VF a, VF b) { return _mm256_max_ps(a, b); }
// The sums of the lanes of a, b, c, e -> one vector of 4 floats (in that order).
inline __m128 sum4(VF a, VF b, VF c, VF e) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, e));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
inline float sum(VF a) { return _mm_cvtss_f32(sum4(a, a, a, a)); }
inline float top(VF a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
#endif

}  // namespace chunk

// Rows of a cache side: row t, lanes [j, j + kLanes) as float32.
struct FloatRows {
  const float* p;
  int64_t ld;
  chunk::VF load(int t, int64_t j) const { return chunk::load(p + t * ld + j); }
};
struct Int8Rows {
  const int8_t* p;
  int64_t ld;
  chunk::VF load(int t, int64_t j) const { return chunk::load_i8(p + t * ld + j); }
};

// s[g * kChunkKeys + t] = c ks[t] (q_g . row_t) for GS queries q (row stride D) and n rows; the
// slots from n to the next multiple of kLanes are set to -inf (a softmax weight of 0).
template <int GS, class Rows>
inline void chunk_scores(const float* q, int64_t D, const Rows& rows, int n, const float* ks, float c, float* s) {
  using namespace chunk;
  int t = 0;
  for (; t + 4 <= n; t += 4) {
    VF acc[GS][4];
    for (int g = 0; g < GS; ++g)
      for (int i = 0; i < 4; ++i) acc[g][i] = zero();
    for (int64_t j = 0; j < D; j += kLanes) {
      const VF k0 = rows.load(t, j), k1 = rows.load(t + 1, j), k2 = rows.load(t + 2, j), k3 = rows.load(t + 3, j);
      for (int g = 0; g < GS; ++g) {
        const VF qv = chunk::load(q + g * D + j);
        acc[g][0] = fmadd(qv, k0, acc[g][0]);
        acc[g][1] = fmadd(qv, k1, acc[g][1]);
        acc[g][2] = fmadd(qv, k2, acc[g][2]);
        acc[g][3] = fmadd(qv, k3, acc[g][3]);
      }
    }
    const __m128 f = ks == nullptr ? _mm_set1_ps(c) : _mm_mul_ps(_mm_set1_ps(c), _mm_loadu_ps(ks + t));
    for (int g = 0; g < GS; ++g)
      _mm_storeu_ps(s + g * kChunkKeys + t, _mm_mul_ps(f, sum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3])));
  }
  for (; t < n; ++t) {
    VF acc[GS];
    for (int g = 0; g < GS; ++g) acc[g] = zero();
    for (int64_t j = 0; j < D; j += kLanes) {
      const VF k = rows.load(t, j);
      for (int g = 0; g < GS; ++g) acc[g] = fmadd(chunk::load(q + g * D + j), k, acc[g]);
    }
    const float f = ks == nullptr ? c : c * ks[t];
    for (int g = 0; g < GS; ++g) s[g * kChunkKeys + t] = f * sum(acc[g]);
  }
  for (; t % kLanes != 0; ++t)
    for (int g = 0; g < GS; ++g) s[g * kChunkKeys + t] = -std::numeric_limits<float>::infinity();
}

// p = exp(s - max s) in place over the first `lanes` slots (a multiple of kLanes) -> (max, sum p).
inline void chunk_softmax(float* s, int lanes, float* max_out, float* sum_out) {
  using namespace chunk;
  VF m = set1(-std::numeric_limits<float>::infinity());
  for (int t = 0; t < lanes; t += kLanes) m = chunk::max(m, chunk::load(s + t));
  const float mx = top(m);
  const Vec shift(mx);
  VF total = zero();
  for (int t = 0; t < lanes; t += kLanes) {
    const VF e = (Vec(chunk::load(s + t)) - shift).exp();
    store(s + t, e);
    total = add(total, e);
  }
  *max_out = mx, *sum_out = sum(total);
}

// out_g [D] (stride per) = sum_t w[g * kChunkKeys + t] row_t for GS queries over n rows;
// D % (4 kLanes) == 0.
template <int GS, class Rows>
inline void chunk_values(const float* w, const Rows& rows, int n, int64_t D, float* out, int64_t per) {
  using namespace chunk;
  for (int64_t j = 0; j < D; j += 4 * kLanes) {
    VF acc[GS][4];
    for (int g = 0; g < GS; ++g)
      for (int i = 0; i < 4; ++i) acc[g][i] = zero();
    for (int t = 0; t < n; ++t) {
      const VF v0 = rows.load(t, j), v1 = rows.load(t, j + kLanes), v2 = rows.load(t, j + 2 * kLanes),
               v3 = rows.load(t, j + 3 * kLanes);
      for (int g = 0; g < GS; ++g) {
        const VF wt = set1(w[g * kChunkKeys + t]);
        acc[g][0] = fmadd(wt, v0, acc[g][0]);
        acc[g][1] = fmadd(wt, v1, acc[g][1]);
        acc[g][2] = fmadd(wt, v2, acc[g][2]);
        acc[g][3] = fmadd(wt, v3, acc[g][3]);
      }
    }
    for (int g = 0; g < GS; ++g)
      for (int i = 0; i < 4; ++i) store(out + g * per + j + i * kLanes, acc[g][i]);
  }
}

// GS query heads q (row stride D) against one chunk: n rows of keys and values (their scales ks, vs,
// or nullptr for float rows) -> part[g * per + 0, 1, 2..] = max, sum of exp, unnormalised output.
// s: [GS * kChunkKeys] scratch.
template <int GS, class Rows>
inline void chunk_attend(const float* q, int64_t D, const Rows& keys, const Rows& values, int n, const float* ks,
                         const float* vs, float c, float* s, float* part, int64_t per) {
  chunk_scores<GS>(q, D, keys, n, ks, c, s);
  const int lanes = (n + chunk::kLanes - 1) / chunk::kLanes * chunk::kLanes;
  for (int g = 0; g < GS; ++g) {
    float* sg = s + g * kChunkKeys;
    chunk_softmax(sg, lanes, part + g * per, part + g * per + 1);
    if (vs != nullptr)
      for (int t = 0; t < n; ++t) sg[t] *= vs[t];  // the value rows' scales folded into the weights
  }
  chunk_values<GS>(s, values, n, D, part + 2, per);
}

// Whether attend_chunk_group takes head dimension D.
inline bool chunk_head_dim(int64_t D) { return D % (4 * chunk::kLanes) == 0; }

// All `group` query heads of one key head, kGroupHeads at a time (s: [kGroupHeads * kChunkKeys]).
template <class Rows>
inline void chunk_attend_group(const float* q, int64_t group, int64_t D, const Rows& keys, const Rows& values, int n,
                               const float* ks, const float* vs, float c, float* s, float* part, int64_t per) {
  for (int64_t g = 0; g < group; g += chunk::kGroupHeads) {
    const float* qg = q + g * D;
    float* pg = part + g * per;
    switch (std::min<int64_t>(chunk::kGroupHeads, group - g)) {
#if defined(__AVX512F__)
      case 4: chunk_attend<4>(qg, D, keys, values, n, ks, vs, c, s, pg, per); break;
      case 3: chunk_attend<3>(qg, D, keys, values, n, ks, vs, c, s, pg, per); break;
#endif
      case 2: chunk_attend<2>(qg, D, keys, values, n, ks, vs, c, s, pg, per); break;
      default: chunk_attend<1>(qg, D, keys, values, n, ks, vs, c, s, pg, per); break;
    }
  }
}

}  // namespace looplm

#endif  // LOOPLM_ATTEND_CHUNK
