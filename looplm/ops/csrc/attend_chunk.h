// One chunk of split-K decoding attention on AVX-512, for attn_step.cpp's `attend`: up to 64 cached
// rows of one key head, read straight from the cache (float32 rows, or int8 codes whose per-row
// scales are folded into the scores and the softmax weights, so nothing is dequantised into a
// buffer), against the `group` query heads that share the key head. Each key or value row is loaded
// (and converted) once for up to four query heads:
//   scores  s_g,t = c * ks_t * (q_g . code_t)    four keys at a time, 4 x 4 accumulators
//   softmax m_g = max_t s_g,t, p_g,t = exp(s_g,t - m_g), l_g = sum_t p_g,t   whole vectors
//   values  acc_g = sum_t (p_g,t * vs_t) code_t   four 16-lane blocks of D at a time
// (ks, vs: the rows' scales, 1 for float rows; c = 1/sqrt(D)). Head dimensions that are a multiple
// of 64; attend keeps its portable path for others and for builds without AVX-512.
#pragma once

#include "simd.h"  // first: it selects ATen's vector instruction set

#include <algorithm>
#include <cstdint>
#include <limits>

#include "rows_gemm.h"

#ifdef LOOPLM_ROWS_GEMM
#include <immintrin.h>

namespace looplm {

constexpr int kChunkKeys = 64;  // rows per chunk

// Rows of a cache side: row t, lanes [j, j + 16) as float32.
struct FloatRows {
  const float* p;
  int64_t ld;
  __m512 load(int t, int64_t j) const { return _mm512_loadu_ps(p + t * ld + j); }
};
struct Int8Rows {
  const int8_t* p;
  int64_t ld;
  __m512 load(int t, int64_t j) const {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + t * ld + j));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
  }
};

// s[g * kChunkKeys + t] = c ks[t] (q_g . row_t) for GS queries q (row stride D) and n rows; the
// slots from n to the next multiple of 16 are set to -inf (a softmax weight of 0).
template <int GS, class Rows>
inline void chunk_scores(const float* q, int64_t D, const Rows& rows, int n, const float* ks, float c, float* s) {
  int t = 0;
  for (; t + 4 <= n; t += 4) {
    __m512 acc[GS][4];
    for (int g = 0; g < GS; ++g)
      for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < D; j += 16) {
      const __m512 k0 = rows.load(t, j), k1 = rows.load(t + 1, j), k2 = rows.load(t + 2, j),
                   k3 = rows.load(t + 3, j);
      for (int g = 0; g < GS; ++g) {
        const __m512 qv = _mm512_loadu_ps(q + g * D + j);
        acc[g][0] = _mm512_fmadd_ps(qv, k0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(qv, k1, acc[g][1]);
        acc[g][2] = _mm512_fmadd_ps(qv, k2, acc[g][2]);
        acc[g][3] = _mm512_fmadd_ps(qv, k3, acc[g][3]);
      }
    }
    const __m128 f = ks == nullptr ? _mm_set1_ps(c) : _mm_mul_ps(_mm_set1_ps(c), _mm_loadu_ps(ks + t));
    for (int g = 0; g < GS; ++g)
      _mm_storeu_ps(s + g * kChunkKeys + t, _mm_mul_ps(f, sum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3])));
  }
  for (; t < n; ++t) {
    __m512 acc[GS];
    for (int g = 0; g < GS; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t j = 0; j < D; j += 16) {
      const __m512 k = rows.load(t, j);
      for (int g = 0; g < GS; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + j), k, acc[g]);
    }
    const float f = ks == nullptr ? c : c * ks[t];
    for (int g = 0; g < GS; ++g) s[g * kChunkKeys + t] = f * _mm512_reduce_add_ps(acc[g]);
  }
  for (; t % 16 != 0; ++t)
    for (int g = 0; g < GS; ++g) s[g * kChunkKeys + t] = -std::numeric_limits<float>::infinity();
}

// p = exp(s - max s) in place over the first `lanes` slots (a multiple of 16) -> (max, sum p).
inline void chunk_softmax(float* s, int lanes, float* top, float* total) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int t = 0; t < lanes; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
  const float mx = _mm512_reduce_max_ps(m);
  const Vec shift(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int t = 0; t < lanes; t += 16) {
    const __m512 e = (Vec(_mm512_loadu_ps(s + t)) - shift).exp();
    _mm512_storeu_ps(s + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  *top = mx, *total = _mm512_reduce_add_ps(sum);
}

// out_g [D] (stride per) = sum_t w[g * kChunkKeys + t] row_t for GS queries over n rows; D % 64 == 0.
template <int GS, class Rows>
inline void chunk_values(const float* w, const Rows& rows, int n, int64_t D, float* out, int64_t per) {
  for (int64_t j = 0; j < D; j += 64) {
    __m512 acc[GS][4];
    for (int g = 0; g < GS; ++g)
      for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_setzero_ps();
    for (int t = 0; t < n; ++t) {
      const __m512 v0 = rows.load(t, j), v1 = rows.load(t, j + 16), v2 = rows.load(t, j + 32),
                   v3 = rows.load(t, j + 48);
      for (int g = 0; g < GS; ++g) {
        const __m512 wt = _mm512_set1_ps(w[g * kChunkKeys + t]);
        acc[g][0] = _mm512_fmadd_ps(wt, v0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(wt, v1, acc[g][1]);
        acc[g][2] = _mm512_fmadd_ps(wt, v2, acc[g][2]);
        acc[g][3] = _mm512_fmadd_ps(wt, v3, acc[g][3]);
      }
    }
    for (int g = 0; g < GS; ++g)
      for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + g * per + j + 16 * i, acc[g][i]);
  }
}

// GS query heads q (row stride D) against one chunk: n rows of keys and values (their scales ks, vs,
// or nullptr for float rows) -> part[g * per + 0, 1, 2..] = max, sum of exp, unnormalised output.
// s: [GS * kChunkKeys] scratch.
template <int GS, class Rows>
inline void chunk_attend(const float* q, int64_t D, const Rows& keys, const Rows& values, int n, const float* ks,
                         const float* vs, float c, float* s, float* part, int64_t per) {
  chunk_scores<GS>(q, D, keys, n, ks, c, s);
  const int lanes = (n + 15) / 16 * 16;
  for (int g = 0; g < GS; ++g) {
    float* sg = s + g * kChunkKeys;
    chunk_softmax(sg, lanes, part + g * per, part + g * per + 1);
    if (vs != nullptr)
      for (int t = 0; t < n; ++t) sg[t] *= vs[t];  // the value rows' scales folded into the weights
  }
  chunk_values<GS>(s, values, n, D, part + 2, per);
}

// All `group` query heads of one key head, four at a time.
template <class Rows>
inline void chunk_attend_group(const float* q, int64_t group, int64_t D, const Rows& keys, const Rows& values, int n,
                               const float* ks, const float* vs, float c, float* s, float* part, int64_t per) {
  for (int64_t g = 0; g < group; g += 4) {
    const float* qg = q + g * D;
    float* pg = part + g * per;
    switch (std::min<int64_t>(4, group - g)) {
      case 4: chunk_attend<4>(qg, D, keys, values, n, ks, vs, c, s, pg, per); break;
      case 3: chunk_attend<3>(qg, D, keys, values, n, ks, vs, c, s, pg, per); break;
      case 2: chunk_attend<2>(qg, D, keys, values, n, ks, vs, c, s, pg, per); break;
      default: chunk_attend<1>(qg, D, keys, values, n, ks, vs, c, s, pg, per); break;
    }
  }
}

}  // namespace looplm

#endif  // LOOPLM_ROWS_GEMM
