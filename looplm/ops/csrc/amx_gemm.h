// x W^T in bfloat16 on AMX tiles (Intel Sapphire Rapids and later), float32 sums: the products of
// many rows of x (a batched decoding step, a prefill) with weights that another routine turns into
// bfloat16 32 rows at a time (qmatvec.h dequantises int8 / int4 weights into them, or rounds
// float32 ones for a prompt read in bfloat16).
//
// Why hand-written: MKL's bf16 product (cblas_gemm_bf16bf16f32) repacks both operands on every
// call, and a call per cache-sized tile of dequantised weights repacked x each time (~16% of a
// 16-row int4 decoding step of SmolLM2-135M, `perf`); a call per whole matrix would write the
// dequantised matrix to memory and read it back. Here a strip of 32 weight rows is dequantised into
// L1 and multiplied by every row of x while it is there; x is packed once per call.
//
// Tiles (palette 1, eight tiles of 16 rows x 64 bytes): C0..C3 the float32 sums of 2 x 2 blocks of
// [16 weight rows x 16 rows of x], A0, A1 two blocks of 16 weight rows x 32 inputs (bf16, rows of
// the strip as they are), B0, B1 two blocks of 16 rows of x in the pair-interleaved layout TDPBF16PS
// takes (tile row p holds inputs 2p, 2p+1 of each of the 16 rows). C[i][m] += sum_p A[i][2p..2p+1] .
// B[p][2m..2m+1] is then weight row i times x row m over 32 inputs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LOOPLM_AMX 1
#endif

namespace looplm {

#ifdef LOOPLM_AMX
constexpr int64_t kAmxRows = 16;   // rows of a tile: x rows per block, weight rows per A tile
constexpr int64_t kAmxK = 32;      // bf16 inputs per tile row (64 bytes)
constexpr int64_t kAmxStrip = 32;  // weight rows dequantised at a time (two A tiles)

// Whether this process may use the tiles: Linux hands a process AMX's tile state only once asked
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); kernels before 5.16 refuse.
inline bool amx_ready() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// 32 floats at p as bfloat16 (rounded to nearest even), in their order.
inline __m512i bf16x32(const float* p) {
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
}

// Loads the eight 16 x 64-byte tiles in the calling thread (each thread has its own configuration).
inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// A bf16 buffer that starts on a cache line, kept between calls (grows only): a tile row of 64 bytes
// that straddles two lines costs two loads (a 32 x 576 tile product ran ~1.6x slower from a buffer
// 16 bytes off a line, as malloc's large blocks are).
class TileBuffer {
 public:
  uint16_t* reserve(int64_t n) {
    if (n > n_) {
      const size_t bytes = (static_cast<size_t>(n) * sizeof(uint16_t) + 63) / 64 * 64;
      p_.reset(static_cast<uint16_t*>(std::aligned_alloc(64, bytes)));
      if (p_ == nullptr) throw std::bad_alloc();
      n_ = n;
    }
    return p_.get();
  }

 private:
  struct Free {
    void operator()(uint16_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint16_t[], Free> p_;
  int64_t n_ = 0;
};

// Size in bf16 of x [rows, k] packed by amx_pack_x.
inline int64_t amx_packed_size(int64_t rows, int64_t k) { return (rows + kAmxRows - 1) / kAmxRows * kAmxRows * k; }

// Rows [b0, b1) of blocks of 16 rows of x [rows, k] (k % 32 == 0) into xp: block b, inputs block c
// at xp + (b * k/32 + c) * 512 as one B tile; rows past `rows` are zero. Rounded to nearest even.
inline void amx_pack_x(const float* x, int64_t rows, int64_t k, int64_t b0, int64_t b1, uint16_t* xp) {
  const int64_t kb = k / kAmxK;
  alignas(64) uint32_t pairs[16];
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t m = 0; m < kAmxRows; ++m) {
      const int64_t r = b * kAmxRows + m;
      for (int64_t c = 0; c < kb; ++c) {
        uint32_t* tile = reinterpret_cast<uint32_t*>(xp + (b * kb + c) * kAmxRows * kAmxK);
        if (r < rows) {
          _mm512_store_si512(pairs, bf16x32(x + r * k + c * kAmxK));
        } else {
          std::memset(pairs, 0, sizeof(pairs));
        }
        for (int p = 0; p < 16; ++p) tile[p * 16 + m] = pairs[p];
      }
    }
}

// The 16 columns of a row-major 16 x 16 float matrix (four rounds of interleaving: 32-bit,
// 64-bit, then 128-bit lanes twice).
inline void transpose16(const float* a, __m512 col[16]) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(a + i * 16);
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane L: rows i, i+1 at columns 4L .. 4L+3
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + j]: rows g .. g+3 of column 4L + j in lane L
    const auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
    r[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[g]), pd(t[g + 2])));
    r[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[g]), pd(t[g + 2])));
    r[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[g + 1]), pd(t[g + 3])));
    r[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[g + 1]), pd(t[g + 3])));
  }
  for (int g = 0; g < 16; g += 8)  // t[g + j]: columns j, 8+j; t[g + 4 + j]: 4+j, 12+j (rows g .. g+7)
    for (int j = 0; j < 4; ++j) {
      t[g + j] = _mm512_shuffle_f32x4(r[g + j], r[g + 4 + j], 0x88);
      t[g + 4 + j] = _mm512_shuffle_f32x4(r[g + j], r[g + 4 + j], 0xDD);
    }
  for (int j = 0; j < 4; ++j) {
    col[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    col[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    col[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    col[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
  }
}

// out[r * ldo + j] = x[r] . W[j] for j in [j0, j0 + n) (n <= 32) and every row r < rows of x,
// packed (amx_pack_x); `strip` [32, k] bf16 holds the weight rows (rows past n zero). Tiles
// configured (amx_configure) in this thread.
inline void amx_strip(const uint16_t* xp, int64_t rows, int64_t k, const uint16_t* strip, int64_t n, float* out,
                      int64_t ldo, int64_t j0) {
  const int64_t kb = k / kAmxK, blocks = (rows + kAmxRows - 1) / kAmxRows, stride = k * 2;
  const bool two_w = n > kAmxRows;
  alignas(64) float c[4][kAmxRows][kAmxRows];
  for (int64_t b = 0; b < blocks; b += 2) {
    const bool two_x = b + 1 < blocks;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t q = 0; q < kb; ++q) {
      _tile_loadd(4, strip + q * kAmxK, stride);
      _tile_loadd(6, xp + (b * kb + q) * kAmxRows * kAmxK, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (two_w) {
        _tile_loadd(5, strip + kAmxRows * k + q * kAmxK, stride);
        _tile_dpbf16ps(1, 5, 6);
      }
      if (two_x) {
        _tile_loadd(7, xp + ((b + 1) * kb + q) * kAmxRows * kAmxK, 64);
        _tile_dpbf16ps(2, 4, 7);
        if (two_w) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    // c[2 * xb + wb][i][m]: weight row wb * 16 + i, x row (b + xb) * 16 + m
    for (int xb = 0; xb < (two_x ? 2 : 1); ++xb) {
      const int64_t r0 = (b + xb) * kAmxRows, nm = std::min<int64_t>(kAmxRows, rows - r0);
      for (int wb = 0; wb < (two_w ? 2 : 1); ++wb) {
        const int64_t ni = std::min<int64_t>(kAmxRows, n - wb * kAmxRows);
        __m512 col[16];
        transpose16(&c[2 * xb + wb][0][0], col);
        const __mmask16 keep = static_cast<__mmask16>((1u << ni) - 1);
        for (int64_t m = 0; m < nm; ++m) _mm512_mask_storeu_ps(out + (r0 + m) * ldo + j0 + wb * kAmxRows, keep, col[m]);
      }
    }
  }
}
#endif

}  // namespace looplm
