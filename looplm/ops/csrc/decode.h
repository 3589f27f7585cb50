// Helpers shared by the decoding kernels (layer_step.cpp, moe_step.cpp, attn_step.cpp): argument
// checks, matrix-vector products of a few rows, RMSNorm of rows, the dense SwiGLU FFN (its weights
// float32, int8 or int4: qmatvec.h).
#pragma once

#include "simd.h"  // first: it selects ATen's vector instruction set

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "qmatvec.h"
#include "vec.h"

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

// out[b, part.off + j] = x[b] . part.w[j] for every part, all output rows over threads.
inline void matvecs(const float* x, int64_t rows, int64_t k, const std::vector<Part>& parts, float* out,
             int64_t width) {
  int64_t total = 0;
  for (const Part& p : parts) total += p.n;
  at::parallel_for(0, total, 64, [&](int64_t r0, int64_t r1) {
    int64_t base = 0;
    for (const Part& p : parts) {
      const int64_t a = std::max(r0, base), e = std::min(r1, base + p.n);
      for (int64_t j = a; j < e; ++j) {
        const float* wj = p.w + (j - base) * k;
        for (int64_t b = 0; b < rows; ++b) out[b * width + p.off + j - base] = dot(x + b * k, wj, k);
      }
      base += p.n;
    }
  });
}

// y[b] = x[b] * rsqrt(mean(x[b]^2) + eps) * w, rows of width d (as F.rms_norm).
inline void rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t d, float* y) {
  for (int64_t b = 0; b < rows; ++b) {
    const float* xb = x + b * d;
    const float r = 1.0f / std::sqrt(dot(xb, xb, d) / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) y[b * d + i] = xb[i] * r * w[i];
  }
}

// h [B, d] += W_out (silu(gate) * up) of rmsnorm(h) with W_in [2F, d] (gate | up), W_out [d, F]
// in any of qmatvec.h's weight formats.
inline void add_swiglu_ffn(at::Tensor& h, const at::Tensor& norm_w, double eps, const QWeight& w_in,
                           const QWeight& w_out) {
  const int64_t B = h.size(0), d = h.size(1), F = w_out.k;
  const auto opt = h.options();
  at::Tensor u = at::empty({B, d}, opt), z = at::empty({B, 2 * F}, opt), act = at::empty({B, F}, opt),
             f = at::empty({B, d}, opt);
  float* hp = h.data_ptr<float>();
  rms_norm(hp, fptr(norm_w), static_cast<float>(eps), B, d, u.data_ptr<float>());
  qmatvecs(fptr(u), B, d, {w_in}, {0}, z.data_ptr<float>(), 2 * F);
  const float* zp = fptr(z);
  float* ap = act.data_ptr<float>();
  // each element computed alike wherever the threads' ranges split the rows (silu_mul), so a
  // row's result does not depend on the batch
  at::parallel_for(0, B * F, 4096, [&](int64_t a, int64_t e) {  // many rows: a batch's step
    for (int64_t t = a; t < e;) {
      const int64_t b = t / F, i0 = t % F, n = std::min(e - t, F - i0);
      const float* gate = zp + b * 2 * F + i0;
      silu_mul(gate, gate + F, 1.0f, n, ap + t);
      t += n;
    }
  });
  qmatvecs(ap, B, F, {w_out}, {0}, f.data_ptr<float>(), d);
  const float* fp = fptr(f);
  for (int64_t e = 0; e < B * d; ++e) hp[e] += fp[e];
}

// The same with float32 W_in [2F, d], W_out [d, F].
inline void add_swiglu_ffn(at::Tensor& h, const at::Tensor& norm_w, double eps, const at::Tensor& w_in,
                           const at::Tensor& w_out) {
  const int64_t d = h.size(1), F = w_out.size(1);
  add_swiglu_ffn(h, norm_w, eps, qweight({w_in}, 2 * F, d, "swiglu_ffn"), qweight({w_out}, d, F, "swiglu_ffn"));
}

// The whole-stack attention kernels' weight list (attn_stack_step, attn_stack_verify): kSlots
// entries per layer (norm, qkv (3), o (3), ffn norm, ffn in (3), ffn out (3)); parts_at: the parts
// (1-3 tensors, the rest None) of the weight at slot `at`.
constexpr int64_t kSlots = 14;

inline std::vector<at::Tensor> parts_at(const c10::List<std::optional<at::Tensor>>& w, int64_t at) {
  std::vector<at::Tensor> parts;
  for (int64_t i = at; i < at + 3; ++i) {
    const std::optional<at::Tensor> t = w.get(i);
    if (t.has_value()) parts.push_back(*t);
  }
  return parts;
}

}  // namespace looplm
