// x W^T for the few to some dozens of rows of a batched decoding step, float32: out [rows, n] =
// x [rows, k] times the rows of W [n, k] (row-major, as nn.Linear holds it).
//
// Why not BLAS: at these shapes (rows 4-64, k 576-1536) MKL's sgemm either packs W into its own
// layout on every call (a copy of the whole matrix per product: ~57% of a 16-row float32 step of
// SmolLM2-135M on one thread, `perf`) or runs its unpacked kernels. Here each weight row is read
// once from memory: 4 weight rows at a time stay in L1 while every block of 6 rows of x is
// multiplied by them (24 accumulators of 16 lanes: 24 FMAs per 10 loads), and the 4 x 6 dot
// products are reduced lane-wise four at a time into 4 adjacent outputs. Sums run in another order
// than BLAS's (differences ~1e-7 relative). AVX-512 only (LOOPLM_ROWS_GEMM); elsewhere the callers
// keep BLAS.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LOOPLM_ROWS_GEMM 1
#endif

namespace looplm {

// One weight matrix [n, k] of a group of products that share their input x [B, k]: its outputs go
// to columns off .. off+n-1 of out [B, width] (rows_gemm here, decode.h's matvecs).
struct Part {
  const float* w;
  int64_t n;
  int64_t off;
};

#ifdef LOOPLM_ROWS_GEMM
// The sums of the 16 lanes of a, b, c, e -> one vector of 4 floats (in that order).
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 e) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0 b0 a1 b1 per 128
  const __m512 ce = _mm512_add_ps(_mm512_unpacklo_ps(c, e), _mm512_unpackhi_ps(c, e));
  const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(ce))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(ce))));
  const __m512 t = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, 0x4E));  // 128-bit lanes 2 3 0 1
  const __m512 u = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));  // 1 0 3 2
  return _mm512_castps512_ps128(u);
}

// out[r * ldo + i] = x[r] . w[i] for r < RX, i < RW (RW: 4, or 1 for the last rows of W); x row
// stride k, w row stride k.
template <int RX, int RW>
inline void rows_kernel(const float* x, const float* w, int64_t k, float* out, int64_t ldo, const float* next) {
  __m512 acc[RX][RW];
  for (int r = 0; r < RX; ++r)
    for (int i = 0; i < RW; ++i) acc[r][i] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= k; t += 16) {
    __m512 wv[RW];
    for (int i = 0; i < RW; ++i) wv[i] = _mm512_loadu_ps(w + i * k + t);
    if (next != nullptr)
      for (int i = 0; i < RW; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * k + t), _MM_HINT_T0);
    for (int r = 0; r < RX; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * k + t);
      for (int i = 0; i < RW; ++i) acc[r][i] = _mm512_fmadd_ps(xv, wv[i], acc[r][i]);
    }
  }
  if (t < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - t)) - 1);
    __m512 wv[RW];
    for (int i = 0; i < RW; ++i) wv[i] = _mm512_maskz_loadu_ps(m, w + i * k + t);
    for (int r = 0; r < RX; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * k + t);
      for (int i = 0; i < RW; ++i) acc[r][i] = _mm512_fmadd_ps(xv, wv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < RX; ++r) {
    if constexpr (RW == 4) {
      _mm_storeu_ps(out + r * ldo, sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    } else {
      for (int i = 0; i < RW; ++i) out[r * ldo + i] = _mm512_reduce_add_ps(acc[r][i]);
    }
  }
}

// RW weight rows w times every row of x; the first block of rows prefetches the next RW weight
// rows (`next`, nullptr at the end of the thread's range) into L1 while it reads these.
template <int RW>
inline void rows_block(const float* x, int64_t rows, const float* w, int64_t k, float* out, int64_t ldo,
                       const float* next) {
  constexpr int kRx = 6;
  int64_t r = 0;
  for (; r + kRx <= rows; r += kRx, next = nullptr) rows_kernel<kRx, RW>(x + r * k, w, k, out + r * ldo, ldo, next);
  const float* xr = x + r * k;
  float* o = out + r * ldo;
  switch (rows - r) {
    case 5: rows_kernel<5, RW>(xr, w, k, o, ldo, next); break;
    case 4: rows_kernel<4, RW>(xr, w, k, o, ldo, next); break;
    case 3: rows_kernel<3, RW>(xr, w, k, o, ldo, next); break;
    case 2: rows_kernel<2, RW>(xr, w, k, o, ldo, next); break;
    case 1: rows_kernel<1, RW>(xr, w, k, o, ldo, next); break;
    default: break;
  }
}

// Weight rows [j0, j1): out[r * ldo + j] = x[r] . W[j], one thread.
inline void rows_gemm_range(const float* x, int64_t rows, int64_t k, const float* W, int64_t j0, int64_t j1,
                            float* out, int64_t ldo) {
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) rows_block<4>(x, rows, W + j * k, k, out + j, ldo, j + 8 <= j1 ? W + (j + 4) * k : nullptr);
  for (; j < j1; ++j) rows_block<1>(x, rows, W + j * k, k, out + j, ldo, nullptr);
}

// out[r * ldo + part.off + j] = x[r] . part.w[j] for every part and row j < part.n: the parts'
// weight rows in groups of 4 over threads (one parallel region for them all).
inline void rows_gemm(const float* x, int64_t rows, int64_t k, const std::vector<Part>& parts, float* out,
                      int64_t ldo) {
  int64_t groups = 0;
  for (const Part& p : parts) groups += (p.n + 3) / 4;
  at::parallel_for(0, groups, 8, [&](int64_t a, int64_t e) {
    int64_t base = 0;  // the first group of the part
    for (const Part& p : parts) {
      const int64_t g = (p.n + 3) / 4, lo = std::max(a, base), hi = std::min(e, base + g);
      if (lo < hi) rows_gemm_range(x, rows, k, p.w, 4 * (lo - base), std::min(p.n, 4 * (hi - base)), out + p.off, ldo);
      base += g;
    }
  });
}
#endif

}  // namespace looplm
