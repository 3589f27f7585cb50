// One decoding step (T = 1) of Liger GLA's recurrence (looplm/layers/liger.py, Lan et al. 2025) for
// B rows in one call: the ~30 small PyTorch ops of the Python step (group repeat, two softmax
// feature maps, the key's log-sigmoid gate, decay, outer product, read-out) per layer cost more
// than their arithmetic at 30 layers. The Python layer is the reference; the tests compare them.
#include "simd.h"  // first: it selects ATen's vector instruction set

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using at::Tensor;

inline float logsigmoid(float x) { return std::min(x, 0.0f) - std::log1p(std::exp(-std::fabs(x))); }

// x [D] -> softmax(x) [D] (max subtracted first, as torch.softmax).
void softmax(const float* x, int64_t D, float* out) {
  const float top = *std::max_element(x, x + D);
  float total = 0.0f;
  for (int64_t i = 0; i < D; ++i) total += out[i] = std::exp(x[i] - top);
  const float inv = 1.0f / total;
  for (int64_t i = 0; i < D; ++i) out[i] *= inv;
}

// qkv [B, H + 2 Hkv, D]: q, k, v as projected (before RoPE); ssm [B, H, D, D]; inv_freq [D/2] and
// positions [B] long (RoPE, as looplm.ops.attention.rope_cos_sin) -> (o [B, H, D], ssm', qk [B,
// H + Hkv, D]: q and k rotated by their row's position, for the window's attention). Per query
// head h (key/value head h / (H / Hkv)): q' = softmax(q), k' = softmax(k), a = exp(logsigmoid(k) /
// tau) per key channel; S' = diag(a) S + k'^T v; o = q' S'.
std::vector<Tensor> liger_gla_step(const Tensor& qkv, const Tensor& ssm, int64_t n_heads, int64_t n_kv_heads,
                                   double tau, const Tensor& inv_freq, const Tensor& positions) {
  TORCH_CHECK(qkv.dim() == 3 && ssm.dim() == 4 && n_kv_heads > 0 && n_heads % n_kv_heads == 0,
              "liger_gla_step: qkv [B, H + 2 Hkv, D], ssm [B, H, D, D], H a multiple of Hkv");
  const int64_t B = qkv.size(0), H = n_heads, Hkv = n_kv_heads, D = qkv.size(2), group = H / Hkv;
  TORCH_CHECK(qkv.size(1) == H + 2 * Hkv && ssm.size(0) == B && ssm.size(1) == H && ssm.size(2) == D &&
                  ssm.size(3) == D,
              "liger_gla_step: qkv [B, H + 2 Hkv, D] and ssm [B, H, D, D] disagree");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && ssm.scalar_type() == at::kFloat && qkv.device().is_cpu() &&
                  ssm.device().is_cpu(),
              "liger_gla_step: float32 CPU tensors");
  TORCH_CHECK(inv_freq.dim() == 1 && 2 * inv_freq.size(0) == D && inv_freq.scalar_type() == at::kFloat &&
                  positions.dim() == 1 && positions.size(0) == B && positions.scalar_type() == at::kLong,
              "liger_gla_step: inv_freq float32 [D/2], positions long [B]");
  const Tensor x = qkv.contiguous(), s0 = ssm.contiguous();
  Tensor o = at::empty({B, H, D}, qkv.options()), s1 = at::empty_like(s0);
  const float *xp = x.data_ptr<float>(), *sp = s0.data_ptr<float>();
  float *op = o.data_ptr<float>(), *np = s1.data_ptr<float>();
  const float inv_tau = static_cast<float>(1.0 / tau);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(D), kf(D), a(D);
    for (int64_t bh = i0; bh < i1; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / group;
      const float* row = xp + b * (H + 2 * Hkv) * D;
      const float *q = row + h * D, *k = row + (H + hk) * D, *v = row + (H + Hkv + hk) * D;
      softmax(q, D, qf.data());
      softmax(k, D, kf.data());
      for (int64_t i = 0; i < D; ++i) a[i] = std::exp(logsigmoid(k[i]) * inv_tau);
      const float* s = sp + bh * D * D;
      float* sn = np + bh * D * D;
      float* ob = op + bh * D;
      std::fill(ob, ob + D, 0.0f);
      for (int64_t i = 0; i < D; ++i) {
        const float ai = a[i], ki = kf[i], qi = qf[i];
        const float* si = s + i * D;
        float* ni = sn + i * D;
        for (int64_t j = 0; j < D; ++j) {
          ni[j] = si[j] * ai + ki * v[j];
          ob[j] += qi * ni[j];
        }
      }
    }
  });
  const int64_t half = D / 2, R = H + Hkv;
  Tensor qk = x.slice(1, 0, R).contiguous();
  const Tensor f = inv_freq.contiguous(), pos = positions.contiguous();
  std::vector<float> c(half), sn(half);
  for (int64_t b = 0; b < B; ++b) {
    const float p = static_cast<float>(pos.data_ptr<int64_t>()[b]);
    for (int64_t j = 0; j < half; ++j) {
      const float angle = p * f.data_ptr<float>()[j];
      c[j] = std::cos(angle);
      sn[j] = std::sin(angle);
    }
    for (int64_t r = 0; r < R; ++r) {  // "rotate half": pairs (j, j + D/2)
      float* y = qk.data_ptr<float>() + (b * R + r) * D;
      for (int64_t j = 0; j < half; ++j) {
        const float y1 = y[j], y2 = y[half + j];
        y[j] = y1 * c[j] - y2 * sn[j];
        y[half + j] = y2 * c[j] + y1 * sn[j];
      }
    }
  }
  return {o, s1, qk};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
  m.def("liger_gla_step(Tensor qkv, Tensor ssm, int n_heads, int n_kv_heads, float tau, Tensor inv_freq, "
        "Tensor positions) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) { m.impl("liger_gla_step", liger_gla_step); }
