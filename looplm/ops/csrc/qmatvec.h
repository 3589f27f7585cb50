// Matrix-vector products of a few rows with float32, int8 or int4 weights: the decoding kernels'
// weight formats (looplm/ops/qlinear.py explains why and holds the PyTorch reference).
//
// Weights [n, k], given as a list of tensors:
//   float32  [w]                     w [n, k]
//   int8     [q, scale]              q int8 [n, k], scale float32 [n] (one per row) or [n, k/g]
//                                    (one per group of g inputs): W = scale * q
//   int4     [packed, scale, offset] packed uint8 [n, k/2] (element 2j in byte j's low nibble,
//                                    2j+1 in its high one), scale, offset float32 [n, k/g]:
//                                    W = offset + scale * q for the g inputs of a group
// Quantised weights multiply a row x quantised to int8 in groups of 32 inputs (x ≈ d_b * xq,
// d_b = max|x_b| / 127), with integer dot products per group, scaled in float (the instruction
// set is the build machine's, -march=native: AVX-512 VNNI vpdpbusd on 512-bit vectors for int4
// and 256-bit ones for int8 where the CPU has it, AVX2 vpmaddubsw + vpmaddwd on AVX2-only CPUs
// such as older AMD EPYCs, plain loops elsewhere):
//   int8: y = scale * sum_b d_b (xq_b . q_b) per row, y = sum_b d_b s_G(b) (xq_b . q_b) in groups
//   int4: y = sum_b d_b s_G(b) (xq_b . q_b) + sum_G offset_G sum_{b in G} d_b sum(xq_b)
// (llama.cpp's Q8_0 x Q8_0 and Q4_1 x Q8_1 dot products compute the same sums). Float32 weights
// times kGemmRows rows or more go to rows_gemm.h's blocked product instead (BLAS where it is not
// built): a batch of decoding rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "amx_gemm.h"
#include "rows_gemm.h"
#include "vec.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LOOPLM_VNNI 1
#define LOOPLM_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOOPLM_SIMD 1
#endif

namespace looplm {

constexpr int64_t kQGroup = 32;  // inputs per activation quantisation group

// One weight matrix [n, k] in a kernel format (pointers into tensors the caller keeps alive).
struct QWeight {
  enum Kind { F32, I8, I4 } kind = F32;
  int64_t n = 0, k = 0, group = 0;  // group: inputs per scale (I8 per row: k)
  const float* w = nullptr;          // F32
  const int8_t* q = nullptr;         // I8
  const uint8_t* packed = nullptr;   // I4
  const float* scale = nullptr;      // I8, I4 [n, k/group]
  const float* offset = nullptr;     // I4 [n, k/group]
  bool quantised() const { return kind != F32; }
};

inline void check_part(const at::Tensor& t, at::ScalarType dtype, std::vector<int64_t> shape, const char* op,
                       const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu(), op, ": ", what,
              " must be a contiguous CPU tensor of ", dtype);
  TORCH_CHECK(t.sizes().vec() == shape, op, ": ", what, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(shape));
}

// Groups of a scale [n, groups] over k inputs (each a multiple of kQGroup inputs).
inline int64_t group_count(const at::Tensor& scale, int64_t k, const char* op, const char* what) {
  TORCH_CHECK(scale.dim() == 2 && scale.size(1) > 0, op, ": ", what, " scale must be a matrix [n, groups]");
  const int64_t groups = scale.size(1), g = k / groups;
  TORCH_CHECK(g * groups == k && g % kQGroup == 0, op, ": ", what, " group size must be a multiple of ", kQGroup);
  return groups;
}

// The weight [n, k] held by `parts` (see the top of this file); `op` names the kernel in errors.
inline QWeight qweight(const std::vector<at::Tensor>& parts, int64_t n, int64_t k, const char* op) {
  QWeight W;
  W.n = n;
  W.k = k;
  if (parts.size() == 1) {
    check_part(parts[0], at::kFloat, {n, k}, op, "float32 weight");
    W.w = parts[0].data_ptr<float>();
  } else if (parts.size() == 2) {
    TORCH_CHECK(k % kQGroup == 0, op, ": int8 weights need in_features divisible by ", kQGroup);
    check_part(parts[0], at::kChar, {n, k}, op, "int8 q");
    const bool per_row = parts[1].dim() == 1;
    const int64_t groups = per_row ? 1 : group_count(parts[1], k, op, "int8");
    check_part(parts[1], at::kFloat, per_row ? std::vector<int64_t>{n} : std::vector<int64_t>{n, groups}, op,
               "int8 scale");
    W.kind = QWeight::I8;
    W.group = k / groups;
    W.q = parts[0].data_ptr<int8_t>();
    W.scale = parts[1].data_ptr<float>();
  } else {
    TORCH_CHECK(parts.size() == 3, op, ": weight parts must be [w], [q, scale] or [packed, scale, offset]");
    const int64_t groups = group_count(parts[1], k, op, "int4"), g = k / groups;
    check_part(parts[0], at::kByte, {n, k / 2}, op, "int4 packed");
    check_part(parts[1], at::kFloat, {n, groups}, op, "int4 scale");
    check_part(parts[2], at::kFloat, {n, groups}, op, "int4 offset");
    W.kind = QWeight::I4;
    W.group = g;
    W.packed = parts[0].data_ptr<uint8_t>();
    W.scale = parts[1].data_ptr<float>();
    W.offset = parts[2].data_ptr<float>();
  }
  return W;
}

// One row x [k] quantised in groups of 32 for the integer dot products.
struct QRow {
  int64_t k = 0;
  std::vector<int8_t> xq;     // [k] x_i ≈ d_b xq_i
  std::vector<float> d;       // [k/32] the activation groups' scales
  std::vector<float> bsum;    // [k/32] d_b * sum(xq_b): the offset terms of int4
  std::vector<float> lane_d;  // [k/8] d of the activation group of each 8 inputs (a VNNI lane)
  std::vector<uint8_t> ax;    // [k] |xq| (int8 weights: vpdpbusd's unsigned side)
  std::vector<uint32_t> neg;  // [k/32] bit i: xq_i < 0 (the sign moved onto the weight)
  std::vector<int8_t> xeo;    // [k] per 128 inputs (then per 64 for the rest): the even-indexed xq,
                              // then the odd ones (int4: a byte's low and high nibbles)

  void set(const float* x, int64_t k_) {
    k = k_;
    const int64_t nb = k / kQGroup;
    xq.resize(k);
    d.resize(nb);
    bsum.resize(nb);
    lane_d.resize(k / 8);
    ax.resize(k);
    neg.resize(nb);
    xeo.resize(k);
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + b * kQGroup;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
      // the scalar loop below in vectors: the same roundings (the current mode, nearest even)
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float db = amax / 127.0f, inv = db > 0 ? 1.0f / db : 0.0f;
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(inv)));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(inv)));
      const __m256i v = _mm256_set_m128i(_mm512_cvtepi32_epi8(q1), _mm512_cvtepi32_epi8(q0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq.data() + b * kQGroup), v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ax.data() + b * kQGroup), _mm256_abs_epi8(v));
      const uint32_t bits = static_cast<uint32_t>(_mm256_movemask_epi8(v));
      const int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
      float amax = 0;
      for (int64_t i = 0; i < kQGroup; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float db = amax / 127.0f, inv = db > 0 ? 1.0f / db : 0.0f;
      int32_t s = 0;
      uint32_t bits = 0;
      for (int64_t i = 0; i < kQGroup; ++i) {
        const int8_t v = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
        xq[b * kQGroup + i] = v;
        ax[b * kQGroup + i] = static_cast<uint8_t>(v < 0 ? -v : v);
        bits |= static_cast<uint32_t>(v < 0) << i;
        s += v;
      }
#endif
      d[b] = db;
      bsum[b] = db * static_cast<float>(s);
      neg[b] = bits;
      for (int64_t l = 0; l < kQGroup / 8; ++l) lane_d[b * (kQGroup / 8) + l] = db;
    }
    int64_t c = 0;
    for (const int64_t w : {128, 64}) {
      for (; c + w <= k; c += w) {
        for (int64_t i = 0; i < w / 2; ++i) {
          xeo[c + i] = xq[c + 2 * i];
          xeo[c + w / 2 + i] = xq[c + 2 * i + 1];
        }
      }
    }
  }
};

#ifdef LOOPLM_SIMD
// acc + the sums of 4 adjacent products u * s per 32-bit lane (u unsigned, s signed bytes; on AVX2
// the pairs' 16-bit sums cannot saturate here: |u| <= 127 with s in [-127, 127], or u <= 15)
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#ifdef LOOPLM_VNNI
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
#endif

#ifdef LOOPLM_VNNI
// The sum of a's 16 lanes as ((c0 + c2) + (c1 + c3)) over its 128-bit chunks c, then (e0 + e2) +
// (e1 + e3) over the 4 floats e left: reduce4's order for one vector.
inline float reduce1(__m512 a) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, _MM_SHUFFLE(2, 3, 0, 1))));
}

// out[i] = reduce1(a[i]) for 4 vectors at once (the same additions, shared shuffles).
inline void reduce4(const __m512* a, float* out) {
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
  const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));  // chunk i: a[i]'s 4
  const __m512 p = _mm512_add_ps(q, _mm512_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 t = _mm512_add_ps(p, _mm512_shuffle_ps(p, p, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm_storeu_ps(out, _mm512_castps512_ps128(
                         _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), t)));
}
#endif

// y[r ldy + i] = sum_b d_b s_i,G(b) (xq_b . q_b) for R consecutive int8 weight rows q (row stride k)
// with `groups` scales each (row stride groups) and NR activation rows x[r]. Grouped: each
// activation group's factor d_b becomes d_b s_i,G(b); per row (groups == 1): the row's scale
// multiplies the sum once at the end. Each weight vector is loaded once for all NR rows; every
// (weight row, activation row) pair runs the same operations in the same order as NR == 1 does,
// so a row's result does not depend on the rows beside it.
template <int R, int NR, bool Grouped>
inline void dot_i8(const QRow* const* x, const int8_t* q, const float* scale, int64_t groups, float* y,
                   int64_t ldy) {
  const int64_t k = x[0]->k, nb = k / kQGroup, per = nb / groups;
#ifdef LOOPLM_SIMD
  __m256 acc[R][NR];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  int64_t G = 0, left = per;  // the weight group of activation group b, and its activation groups to go
  for (int64_t b = 0; b < nb; ++b) {
    __m256i a[NR];
#ifdef LOOPLM_VNNI
    __mmask32 neg[NR];
#else
    __m256i xs[NR];
#endif
    for (int r = 0; r < NR; ++r) {
      a[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r]->ax.data() + b * kQGroup));
#ifdef LOOPLM_VNNI
      neg[r] = static_cast<__mmask32>(x[r]->neg[b]);
#else
      xs[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r]->xq.data() + b * kQGroup));
#endif
    }
    for (int i = 0; i < R; ++i) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * k + b * kQGroup));
      for (int r = 0; r < NR; ++r) {
        const __m256 db = _mm256_set1_ps(Grouped ? x[r]->d[b] * scale[i * groups + G] : x[r]->d[b]);
#ifdef LOOPLM_VNNI
        const __m256i sw = _mm256_mask_sub_epi8(w, neg[r], _mm256_setzero_si256(), w);
#else
        const __m256i sw = _mm256_sign_epi8(w, xs[r]);  // the sign of x moved onto w (0 where x is 0)
#endif
        acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dpbusd(_mm256_setzero_si256(), a[r], sw)), db, acc[i][r]);
      }
    }
    if (Grouped && --left == 0) {
      ++G;
      left = per;
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < R; ++i) y[r * ldy + i] = Grouped ? hsum(acc[i][r]) : hsum(acc[i][r]) * scale[i];
#else
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < R; ++i) {
      float acc = 0;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t s = 0;
        for (int64_t e = 0; e < kQGroup; ++e)
          s += int32_t(x[r]->xq[b * kQGroup + e]) * int32_t(q[i * k + b * kQGroup + e]);
        acc += (Grouped ? x[r]->d[b] * scale[i * groups + b / per] : x[r]->d[b]) * static_cast<float>(s);
      }
      y[r * ldy + i] = Grouped ? acc : acc * scale[i];
    }
  }
#endif
}

// Integer dot product of the int4 codes of inputs [32 b, 32 b + 32) with xq (scalar).
inline int32_t dot_i4_group(const QRow& x, const uint8_t* packed, int64_t b) {
  int32_t s = 0;
  const uint8_t* p = packed + b * (kQGroup / 2);
  const int8_t* xb = x.xq.data() + b * kQGroup;
  for (int64_t j = 0; j < kQGroup / 2; ++j) s += int32_t(p[j] & 15) * xb[2 * j] + int32_t(p[j] >> 4) * xb[2 * j + 1];
  return s;
}

// R consecutive int4 weight rows (packed row stride k/2, scale / offset row stride k/g) times NR
// activation rows x[r] into y[r ldy + i]; xs[r] [k/g]: the sum of row r's activation-group sums per
// weight group (the offset terms). A vector step takes 128 inputs (64 bytes, 512-bit) or 64 (32
// bytes): 32-bit lane l sums the products of inputs [8 l, 8 l + 8) of the step (low nibbles with
// the even inputs, high with the odd: x.xeo's layout), so each lane lies in one activation group
// of 32 and is scaled by its d and its weight group's scale. The codes of a step are loaded and
// unpacked once for all NR rows; every (weight row, activation row) pair runs the same operations
// in the same order as NR == 1 does, so a row's result does not depend on the rows beside it.
template <int R, int NR>
inline void dot_i4(const QRow* const* x, const uint8_t* packed, const float* scale, const float* offset, int64_t g,
                   const float* const* xs, float* y, int64_t ldy) {
  const int64_t k = x[0]->k, per = g / kQGroup, groups = k / g, pk = k / 2;
  float acc[R][NR] = {};
  int64_t done = 0;       // inputs handled by the vector loops
  bool offsets = false;   // whether acc holds the offset terms
#ifdef LOOPLM_SIMD
  {
#ifdef LOOPLM_VNNI
    if (g == 32 || g == 64 || g % 128 == 0) {  // lanes' scales: 4, 2 or 1 per step
      __m512 zacc[NR][R];
      for (int r = 0; r < NR; ++r)
        for (int i = 0; i < R; ++i) zacc[r][i] = _mm512_setzero_ps();
      const __m512i low = _mm512_set1_epi8(15);
      const __m512i spread = g == 32 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                                     : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
      for (; done + 128 <= k; done += 128) {
        for (int i = 0; i < R; ++i) {
          const __m512i v = _mm512_loadu_si512(packed + i * pk + done / 2);
          const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          const float* sc = scale + i * groups + done / g;
          __m512 sl;
          if (g == 32) {
            sl = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(sc)));
          } else if (g == 64) {
            sl = _mm512_permutexvar_ps(
                spread, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sc)))));
          } else {
            sl = _mm512_set1_ps(*sc);
          }
          for (int r = 0; r < NR; ++r) {
            const __m512i xe = _mm512_loadu_si512(x[r]->xeo.data() + done);
            const __m512i xo = _mm512_loadu_si512(x[r]->xeo.data() + done + 64);
            const __m512 dl = _mm512_loadu_ps(x[r]->lane_d.data() + done / 8);
            const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe), hi, xo);
            zacc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sl, dl), zacc[r][i]);
          }
        }
      }
      if (done + 64 <= k) {  // 64 inputs left (x.xeo: 32 even, 32 odd) in 256-bit vectors, into the low lanes
        const __m256i low4 = _mm256_set1_epi8(15);
        for (int i = 0; i < R; ++i) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + i * pk + done / 2));
          const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          const float* sc = scale + i * groups + done / g;
          const __m256 sl = g == 32 ? _mm256_setr_ps(sc[0], sc[0], sc[0], sc[0], sc[1], sc[1], sc[1], sc[1])
                                    : _mm256_set1_ps(sc[0]);
          for (int r = 0; r < NR; ++r) {
            const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r]->xeo.data() + done));
            const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r]->xeo.data() + done + 32));
            const __m256 dl = _mm256_loadu_ps(x[r]->lane_d.data() + done / 8);
            const __m256i s = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xe), hi, xo);
            zacc[r][i] = _mm512_fmadd_ps(_mm512_zextps256_ps512(_mm256_cvtepi32_ps(s)),
                                         _mm512_zextps256_ps512(_mm256_mul_ps(sl, dl)), zacc[r][i]);
          }
        }
        done += 64;
      }
      for (int64_t G = 0; G < groups; G += 16) {  // the offset terms, 16 weight groups at a time
        const __mmask16 m = static_cast<__mmask16>(groups - G >= 16 ? 0xFFFF : (1u << (groups - G)) - 1);
        for (int i = 0; i < R; ++i) {
          const __m512 off = _mm512_maskz_loadu_ps(m, offset + i * groups + G);
          for (int r = 0; r < NR; ++r)
            zacc[r][i] = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(m, xs[r] + G), zacc[r][i]);
        }
      }
      offsets = true;
      float sums[R];
      for (int r = 0; r < NR; ++r) {
        if constexpr (R == 4) {
          reduce4(zacc[r], sums);
        } else {
          for (int i = 0; i < R; ++i) sums[i] = reduce1(zacc[r][i]);
        }
        for (int i = 0; i < R; ++i) acc[i][r] = sums[i];
      }
    }
#endif
    if (!offsets) {  // no 512-bit loop: 64 inputs a step
      __m256 facc[R][NR];
      for (int i = 0; i < R; ++i)
        for (int r = 0; r < NR; ++r) facc[i][r] = _mm256_setzero_ps();
      const __m256i low = _mm256_set1_epi8(15);
      const __m256i first_half = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
      const bool by128 = done == 0;  // no 512-bit loop: x.xeo is laid out per 128 inputs up to k - k % 128
      const bool one_scale = g % 64 == 0;  // else g == 32 (two per step) or the scalar loop
      for (; (g == 32 || one_scale) && done + 64 <= k; done += 64) {  // 64 inputs: 32 bytes, 8 lanes
        // where x.xeo holds [64 even, 64 odd] per 128 inputs, the 32 even of this half start at
        // done - done % 128 + done % 128 / 2, the odd 64 later
        const bool in128 = by128 && done - done % 128 + 128 <= k;
        const int64_t e0 = in128 ? done - done % 128 + (done % 128) / 2 : done, o0 = e0 + (in128 ? 64 : 32);
        for (int i = 0; i < R; ++i) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + i * pk + done / 2));
          const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          const float* sc = scale + i * groups;
          __m256 sl;
          if (g == 32) {  // lanes 0-3: group done/32, lanes 4-7: the next one
            sl = _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sc + done / 32)))),
                first_half);
          } else {
            sl = _mm256_set1_ps(sc[done / g]);
          }
          for (int r = 0; r < NR; ++r) {
            const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r]->xeo.data() + e0));
            const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r]->xeo.data() + o0));
            const __m256 dl = _mm256_loadu_ps(x[r]->lane_d.data() + done / 8);
            const __m256i s = dpbusd(dpbusd(_mm256_setzero_si256(), lo, xe), hi, xo);
            facc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(sl, dl), facc[i][r]);
          }
        }
      }
      for (int i = 0; i < R; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r] += hsum(facc[i][r]);
    }
  }
#endif
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < R; ++i) {
      const float* sc = scale + i * groups;
      for (int64_t b = done / kQGroup; b < k / kQGroup; ++b)
        acc[i][r] += sc[b / per] * x[r]->d[b] * static_cast<float>(dot_i4_group(*x[r], packed + i * pk, b));
      y[r * ldy + i] = offsets ? acc[i][r] : acc[i][r] + dot(offset + i * groups, xs[r], groups);
    }
  }
}

// Activation rows a call of the dot products takes at once (each weight vector unpacked once for
// them all: a verification's few rows); more are taken in turns. Fewer on AVX2, which has 16
// vector registers instead of 32.
#ifdef LOOPLM_VNNI
constexpr int kActRows = 8;
#else
constexpr int kActRows = 2;
#endif

// Rows [j0, j1) of W times the nr <= kActRows activation rows x[r] (float32 xf[r], xs[r] as dot_i4
// takes it) into o[r ldo + j - j0], a few weight rows at a time.
template <int NR>
inline void qrows_of(const QWeight& W, const QRow* const* x, const float* const* xf, const float* const* xs,
                     int64_t j0, int64_t j1, float* o, int64_t ldo) {
  const int64_t k = W.k;
  constexpr int R = NR <= 4 ? 4 : 2;  // weight rows at a time: R x NR accumulators in registers
  int64_t j = j0;
  o -= j0;
  if (W.kind == QWeight::F32) {
    for (int r = 0; r < NR; ++r)
      for (j = j0; j < j1; ++j) o[r * ldo + j] = dot(xf[r], W.w + j * k, k);
  } else if (W.kind == QWeight::I8) {
    const int64_t groups = k / W.group;
    if (groups == 1) {
      for (; j + R <= j1; j += R) dot_i8<R, NR, false>(x, W.q + j * k, W.scale + j, 1, o + j, ldo);
      for (; j < j1; ++j) dot_i8<1, NR, false>(x, W.q + j * k, W.scale + j, 1, o + j, ldo);
    } else {
      for (; j + R <= j1; j += R) dot_i8<R, NR, true>(x, W.q + j * k, W.scale + j * groups, groups, o + j, ldo);
      for (; j < j1; ++j) dot_i8<1, NR, true>(x, W.q + j * k, W.scale + j * groups, groups, o + j, ldo);
    }
  } else {
    const int64_t groups = k / W.group;
    for (; j + R <= j1; j += R)
      dot_i4<R, NR>(x, W.packed + j * (k / 2), W.scale + j * groups, W.offset + j * groups, W.group, xs, o + j, ldo);
    for (; j < j1; ++j)
      dot_i4<1, NR>(x, W.packed + j * (k / 2), W.scale + j * groups, W.offset + j * groups, W.group, xs, o + j, ldo);
  }
}

// qrows_of for nr = 1 .. kActRows activation rows.
inline void qrows(int64_t nr, const QWeight& W, const QRow* const* x, const float* const* xf, const float* const* xs,
                  int64_t j0, int64_t j1, float* o, int64_t ldo) {
  switch (nr) {
    case 1: return qrows_of<1>(W, x, xf, xs, j0, j1, o, ldo);
    case 2: return qrows_of<2>(W, x, xf, xs, j0, j1, o, ldo);
#ifdef LOOPLM_VNNI
    case 3: return qrows_of<3>(W, x, xf, xs, j0, j1, o, ldo);
    case 4: return qrows_of<4>(W, x, xf, xs, j0, j1, o, ldo);
    case 5: return qrows_of<5>(W, x, xf, xs, j0, j1, o, ldo);
    case 6: return qrows_of<6>(W, x, xf, xs, j0, j1, o, ldo);
    case 7: return qrows_of<7>(W, x, xf, xs, j0, j1, o, ldo);
    case 8: return qrows_of<8>(W, x, xf, xs, j0, j1, o, ldo);
#endif
    default: TORCH_CHECK(false, "qrows: ", nr, " rows at once, at most ", kActRows);
  }
}

// From this many rows on, int8 / int4 weights are dequantised 32 rows at a time into bfloat16 and
// multiplied by every row of x on AMX tiles (amx_gemm.h) instead: the dequantisation is paid once
// per step for all rows, and a tile product does 16 x 16 x 32 multiply-adds. Error: x and W
// rounded to bfloat16 (2^-9 relative), of the order of the int8 activations of the row-by-row
// path, but not the same bits. 9: more rows than one pass of the row-by-row kernel (kActRows, 8 on
// the VNNI CPUs that AMX ones are), where the tiles' one dequantisation starts to pay (int4
// SmolLM2-135M decoding steps of 4-12 rows timed both ways: the row-by-row kernel was faster at 4
// and 8 rows, the tiles at 9 and 12).
constexpr int64_t kBf16Rows = 9;

// Rows of x from which qmatvecs takes quantised weights through bfloat16 (0: never, on this build
// or CPU).
inline int64_t bf16_rows() {
#ifdef LOOPLM_AMX
  return amx_ready() ? kBf16Rows : 0;
#else
  return 0;
#endif
}

#ifdef LOOPLM_AMX
// Weight rows [j0, j1) of W as bfloat16 (rounded to nearest even), row-major [j1 - j0, k].
inline void dequant_bf16(const QWeight& W, int64_t j0, int64_t j1, uint16_t* out) {
  const int64_t k = W.k;
  if (W.kind == QWeight::F32) {
    for (int64_t i = 0; i < (j1 - j0) * k; i += 32) _mm512_storeu_si512(out + i, bf16x32(W.w + j0 * k + i));
    return;
  }
  if (W.kind == QWeight::I8) {
    for (int64_t j = j0; j < j1; ++j) {
      uint16_t* o = out + (j - j0) * k;
      for (int64_t i = 0; i < k; i += 32) {
        const __m512 s = _mm512_set1_ps(W.scale[j * (k / W.group) + i / W.group]);
        const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(W.q + j * k + i)));
        const __m512i q2 = _mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(W.q + j * k + i + 16)));
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_mul_ps(s, _mm512_cvtepi32_ps(q2)),
                                               _mm512_mul_ps(s, _mm512_cvtepi32_ps(q)));
        _mm512_storeu_si512(o + i, (__m512i)v);
      }
    }
    return;
  }
  // A group has only 16 values, offset + scale * q for q = 0..15: they are computed once per
  // group (offset + (scale * q) rounded twice, as PyTorch dequantises: the empty asm keeps the
  // compiler from contracting the product and the sum into one fused multiply-add), rounded to
  // bfloat16 into the low half of a register, and each 4-bit code picks its value by a word
  // permutation (vpermw reads the low 5 bits of each 16-bit index). The rows [j0, j1) are
  // contiguous in the packed codes, the scales and the offsets, and in `out`: one run of groups.
  const int64_t group = W.group, blocks = group / 32, groups = (j1 - j0) * (k / group);
  const uint8_t* p = W.packed + j0 * (k / 2);
  const float* scale = W.scale + j0 * (k / group);
  const float* offset = W.offset + j0 * (k / group);
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo4 = _mm512_set1_epi32(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 sq = _mm512_mul_ps(_mm512_set1_ps(scale[g]), codes);
    __asm__("" : "+v"(sq));
    const __m512i table =
        _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_set1_ps(offset[g]), sq)));
    for (int64_t b = 0; b < blocks; ++b, p += 16, out += 32) {
      // byte t (codes 2t: low nibble, 2t + 1: high) -> the 32-bit lane (low nibble) | (byte << 12):
      // word 2t's low 5 bits hold the low nibble, word 2t + 1's the high one
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m512i idx = _mm512_or_si512(_mm512_and_si512(v, lo4), _mm512_slli_epi32(v, 12));
      _mm512_storeu_si512(out, _mm512_permutexvar_epi16(idx, table));
    }
  }
}

// x [rows, k] packed for the tiles (amx_pack_x, its blocks over threads) into a buffer of the
// calling thread's, kept between calls.
inline const uint16_t* amx_packed(const float* x, int64_t rows, int64_t k) {
  thread_local TileBuffer kept;
  uint16_t* xp = kept.reserve(amx_packed_size(rows, k));  // (the lambda runs on other threads too)
  at::parallel_for(0, (rows + kAmxRows - 1) / kAmxRows, 4,
                   [&](int64_t b0, int64_t b1) { amx_pack_x(x, rows, k, b0, b1, xp); });
  return xp;
}

// out[r * ldo + j0 + i] = x[r] . W[j + i] for i < n (n <= kAmxStrip) and every row r of x (xp, from
// amx_packed): the weight rows dequantised into this thread's strip, then multiplied on the tiles
// (configured in this thread).
inline void amx_weight_rows(const QWeight& W, int64_t j, int64_t n, const uint16_t* xp, int64_t rows, float* out,
                            int64_t ldo, int64_t j0) {
  thread_local TileBuffer kept;
  const int64_t k = W.k;
  uint16_t* strip = kept.reserve(kAmxStrip * k);
  dequant_bf16(W, j, j + n, strip);
  if (n < kAmxStrip) std::fill(strip + n * k, strip + kAmxStrip * k, uint16_t{0});
  amx_strip(xp, rows, k, strip, n, out, ldo, j0);
}

// out[r, off + j] = x[r] . W[j] on AMX tiles for quantised weights, and for float32 ones too if
// `all` (else by BLAS in float32): x packed once, strips of 32 weight rows over threads (one
// parallel region per call: each barrier costs), each dequantised (or rounded) into L1 and
// multiplied by every row of x. k % 32 == 0.
inline void qmatmul_bf16(const float* x, int64_t rows, int64_t k, const std::vector<QWeight>& ws,
                         const std::vector<int64_t>& offs, float* out, int64_t width, bool all = false) {
  const uint16_t* xp = amx_packed(x, rows, k);
  std::vector<std::pair<size_t, int64_t>> strips;  // (weight, first row)
  for (size_t p = 0; p < ws.size(); ++p) {
    if (!ws[p].quantised() && !all) {
      const at::Tensor xt = at::from_blob(const_cast<float*>(x), {rows, k}, at::kFloat);
      const at::Tensor wt = at::from_blob(const_cast<float*>(ws[p].w), {ws[p].n, k}, at::kFloat);
      at::Tensor o = at::from_blob(out + offs[p], {rows, ws[p].n}, {width, 1}, at::kFloat);
      at::mm_out(o, xt, wt.t());
      continue;
    }
    for (int64_t j = 0; j < ws[p].n; j += kAmxStrip) strips.emplace_back(p, j);
  }
  at::parallel_for(0, static_cast<int64_t>(strips.size()), 1, [&](int64_t s0, int64_t s1) {
    amx_configure();
    for (int64_t s = s0; s < s1; ++s) {
      const QWeight& W = ws[strips[s].first];
      const int64_t j = strips[s].second;
      amx_weight_rows(W, j, std::min(kAmxStrip, W.n - j), xp, rows, out + offs[strips[s].first], width, j);
    }
    _tile_release();
  });
}
#endif

// From this many rows on, float32 weights are multiplied as a matrix product (rows_gemm.h: each
// weight reused from registers across rows; the row-by-row dot products below re-read it per row).
constexpr int64_t kGemmRows = 4;

// out[r, off + j] = x[r] . W[j] for the rows r of x [rows, k] (float32) and every weight of `ws`
// (each with its column offset `offs`), all weight rows over threads. Quantised weights use xq.
inline void qmatvecs(const float* x, int64_t rows, int64_t k, const std::vector<QWeight>& ws,
                     const std::vector<int64_t>& offs, float* out, int64_t width) {
  // the rows quantised, and per weight and row the activation-group sums per weight group: kept per
  // thread between calls (a decoding step makes ~100 calls; their buffers keep their sizes)
  thread_local std::vector<QRow> xq_kept;
  thread_local std::vector<std::vector<float>> xs_kept;
  std::vector<QRow>& xq = xq_kept;  // (the lambdas below run on other threads: they capture these)
  std::vector<std::vector<float>>& xs = xs_kept;
  const QRow none;
  if (xs.size() < ws.size() * rows) xs.resize(ws.size() * rows);
  bool any_q = false;
  int64_t total = 0;
  for (const QWeight& w : ws) {
    any_q |= w.quantised();
    total += w.n;
  }
#ifdef LOOPLM_ROWS_GEMM
  if (!any_q && rows >= kGemmRows) {  // float32 weights, several rows
    std::vector<Part> parts;
    for (size_t p = 0; p < ws.size(); ++p) parts.push_back({ws[p].w, ws[p].n, offs[p]});
    rows_gemm(x, rows, k, parts, out, width);
    return;
  }
#endif
  if (!any_q && rows >= kGemmRows) {  // the same by BLAS where rows_gemm.h is not built
    const at::Tensor xt = at::from_blob(const_cast<float*>(x), {rows, k}, at::kFloat);
    for (size_t p = 0; p < ws.size(); ++p) {
      const at::Tensor wt = at::from_blob(const_cast<float*>(ws[p].w), {ws[p].n, k}, at::kFloat);
      at::Tensor o = at::from_blob(out + offs[p], {rows, ws[p].n}, {width, 1}, at::kFloat);
      at::mm_out(o, xt, wt.t());
    }
    return;
  }
#ifdef LOOPLM_AMX
  if (any_q && rows >= kBf16Rows && amx_ready()) {
    qmatmul_bf16(x, rows, k, ws, offs, out, width);
    return;
  }
#endif
  if (any_q) {
    if (xq.size() < static_cast<size_t>(rows)) xq.resize(rows);
    at::parallel_for(0, rows, 8, [&](int64_t a, int64_t e) {
      for (int64_t r = a; r < e; ++r) xq[r].set(x + r * k, k);
    });
    for (size_t p = 0; p < ws.size(); ++p) {
      if (ws[p].kind != QWeight::I4) continue;
      const int64_t per = ws[p].group / kQGroup;
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<float>& v = xs[p * rows + r];
        v.assign(k / ws[p].group, 0.0f);
        for (int64_t b = 0; b < k / kQGroup; ++b) v[b / per] += xq[r].bsum[b];
      }
    }
  }
  // Weight rows in tiles of kTile, each tile times every row of x while it sits in cache (many
  // rows of x: a prefill), kActRows rows of x at a time, tiles over threads.
  constexpr int64_t kTile = 64;
  std::vector<const QRow*> xr(static_cast<size_t>(rows), &none);
  std::vector<const float*> xf(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    if (any_q) xr[r] = &xq[r];
    xf[r] = x + r * k;
  }
  at::parallel_for(0, total, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>(kActRows * kTile));
    std::vector<const float*> xsp(static_cast<size_t>(rows), nullptr);
    int64_t base = 0;
    for (size_t p = 0; p < ws.size(); ++p) {
      const QWeight& W = ws[p];
      const int64_t a0 = std::max(r0, base) - base, e0 = std::min(r1, base + W.n) - base;
      if (W.kind == QWeight::I4)
        for (int64_t r = 0; r < rows; ++r) xsp[r] = xs[p * rows + r].data();
      for (int64_t a = a0; a < e0; a += kTile) {
        const int64_t e = std::min(e0, a + kTile);
        for (int64_t r = 0; r < rows; r += kActRows) {
          const int64_t nr = std::min<int64_t>(kActRows, rows - r);
          qrows(nr, W, xr.data() + r, xf.data() + r, xsp.data() + r, a, e, buf.data(), kTile);
          for (int64_t t = 0; t < nr; ++t)
            for (int64_t j = a; j < e; ++j) out[(r + t) * width + offs[p] + j] = buf[t * kTile + j - a];
        }
      }
      base += W.n;
    }
  });
}

}  // namespace looplm
