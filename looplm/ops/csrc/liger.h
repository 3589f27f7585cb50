// What the Liger GLA decoding kernels share (liger_step.cpp: one layer's recurrence; attn_step.cpp's
// attn_stack_step: linearised layers inside the whole-stack step): the recurrence of every head
// for B rows and the RoPE rotation of q and k rows. The Python layer (looplm/layers/liger.py) is
// the reference.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace looplm {

constexpr float kLigerNormEps = 1e-6f;  // looplm/layers/liger.py's NORM_EPS

inline float liger_logsigmoid(float x) { return std::min(x, 0.0f) - std::log1p(std::exp(-std::fabs(x))); }

// x [D] -> softmax(x) [D] (max subtracted first, as torch.softmax).
inline void liger_softmax(const float* x, int64_t D, float* out) {
  const float top = *std::max_element(x, x + D);
  float total = 0.0f;
  for (int64_t i = 0; i < D; ++i) total += out[i] = std::exp(x[i] - top);
  const float inv = 1.0f / total;
  for (int64_t i = 0; i < D; ++i) out[i] *= inv;
}

// qkv [B, H + 2 Hkv, D]: q, k, v as projected (before RoPE); s0 [B, H, D, Dv] -> o [B, H, D], s1
// [B, H, D, Dv]. Per query head h (key/value head h / (H / Hkv)): q' = softmax(q), k' = softmax(k),
// a = exp(logsigmoid(k) / tau) per key channel; S' = diag(a) S + k'^T v; o = q' S'. Dv = D + 1 is
// the normalised read-out: v carries a last component 1 (so S's last column is z, the decayed sum
// of k'), and o = (q' S')[:D] / max((q' S')[D], kLigerNormEps). Heads of all rows split over threads.
inline void liger_gla_heads(const float* qkv, const float* s0, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                            int64_t Dv, float tau, float* o, float* s1) {
  const int64_t group = H / Hkv;
  const float inv_tau = 1.0f / tau;
  const bool norm = Dv > D;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(D), kf(D), a(D), acc(Dv);
    for (int64_t bh = i0; bh < i1; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / group;
      const float* row = qkv + b * (H + 2 * Hkv) * D;
      const float *q = row + h * D, *k = row + (H + hk) * D, *v = row + (H + Hkv + hk) * D;
      liger_softmax(q, D, qf.data());
      liger_softmax(k, D, kf.data());
      for (int64_t i = 0; i < D; ++i) a[i] = std::exp(liger_logsigmoid(k[i]) * inv_tau);
      const float* s = s0 + bh * D * Dv;
      float* sn = s1 + bh * D * Dv;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t i = 0; i < D; ++i) {
        const float ai = a[i], ki = kf[i], qi = qf[i];
        const float* si = s + i * Dv;
        float* ni = sn + i * Dv;
        for (int64_t j = 0; j < D; ++j) {
          ni[j] = si[j] * ai + ki * v[j];
          acc[j] += qi * ni[j];
        }
        if (norm) {
          ni[D] = si[D] * ai + ki;
          acc[D] += qi * ni[D];
        }
      }
      const float inv = norm ? 1.0f / std::max(acc[D], kLigerNormEps) : 1.0f;
      float* ob = o + bh * D;
      for (int64_t j = 0; j < D; ++j) ob[j] = acc[j] * inv;
    }
  });
}

// The first `rows` rows of size D = 2 half of each of B rows of x (row b at x + b * stride) rotated
// by the row's position pos[b] (RoPE, "rotate half": pairs (j, j + half), angle pos * f[j], as
// looplm.ops.attention.rope_cos_sin computes them).
inline void rope_rows(float* x, int64_t B, int64_t stride, int64_t rows, int64_t half, const float* f,
                      const int64_t* pos) {
  const int64_t D = 2 * half;
  std::vector<float> c(half), s(half);
  for (int64_t b = 0; b < B; ++b) {
    const float p = static_cast<float>(pos[b]);
    for (int64_t j = 0; j < half; ++j) {
      const float angle = p * f[j];
      c[j] = std::cos(angle);
      s[j] = std::sin(angle);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* y = x + b * stride + r * D;
      for (int64_t j = 0; j < half; ++j) {
        const float y1 = y[j], y2 = y[half + j];
        y[j] = y1 * c[j] - y2 * s[j];
        y[half + j] = y2 * c[j] + y1 * s[j];
      }
    }
  }
}

}  // namespace looplm
