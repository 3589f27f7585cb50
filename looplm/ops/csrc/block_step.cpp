// One decoding step (T = 1) of a whole pre-norm block with a DeltaNet / gated DeltaNet mixer and
// a dense SwiGLU FFN (or none), for B rows, in one call. See looplm/ops/block_step.py for why
// this exists; the Python block (looplm/layers/block.py and mixers.py) is the reference, and the
// tests compare the two. Every matrix-vector product reads each weight row once for all B rows,
// rows split over threads; the rest (norms, short conv, delta-rule update) is a few thousand
// flops per head and runs on the calling thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "vec.h"

namespace {

using at::Tensor;
using looplm::dot;

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // as F.softplus

// One weight matrix [n, k] of a group of products that share their input x [B, k]: its
// outputs go to columns off .. off+n-1 of out [B, width].
struct Part {
  const float* w;
  int64_t n;
  int64_t off;
};

// out[b, part.off + j] = x[b] . part.w[j] for every part, all output rows over threads.
void matvecs(const float* x, int64_t rows, int64_t k, const std::vector<Part>& parts, float* out,
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
void rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t d, float* y) {
  for (int64_t b = 0; b < rows; ++b) {
    const float* xb = x + b * d;
    const float r = 1.0f / std::sqrt(dot(xb, xb, d) / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) y[b * d + i] = xb[i] * r * w[i];
  }
}

const float* ptr(const Tensor& t) { return t.data_ptr<float>(); }

void check(const Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
              "block_step: ", name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.sizes().vec() == shape, "block_step: ", name, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(shape));
}

// h [B, d]; conv_state [B, K-1, C]; ssm [B, H, dk, dv]; qkv_w [C, d] with C = 2 H dk + H dv;
// conv_w [C, K]; g_w [H dv, d]; beta_w [H, d], beta_b [H]; a_w [H, d], a_log, dt_bias [H] (gated
// DeltaNet only); head_w [dv]; o_w [d, H dv]; ffn_norm_w [d], ffn_in_w [2F, d] (gate | up),
// ffn_out_w [d, F] (all three or none). Returns (h' [B, d], conv_state', ssm').
std::vector<Tensor> block_step(const Tensor& h, const Tensor& conv_state, const Tensor& ssm, const Tensor& norm_w,
                               const Tensor& qkv_w, const Tensor& conv_w, const Tensor& g_w, const Tensor& beta_w,
                               const Tensor& beta_b, const std::optional<Tensor>& a_w,
                               const std::optional<Tensor>& a_log, const std::optional<Tensor>& dt_bias,
                               const Tensor& head_w, const Tensor& o_w, const std::optional<Tensor>& ffn_norm_w,
                               const std::optional<Tensor>& ffn_in_w, const std::optional<Tensor>& ffn_out_w,
                               double norm_eps, double head_eps, double ffn_eps) {
  TORCH_CHECK(h.dim() == 2 && ssm.dim() == 4 && conv_w.dim() == 2, "block_step: h [B, d], ssm [B, H, dk, dv]");
  const int64_t B = h.size(0), d = h.size(1), H = ssm.size(1), dk = ssm.size(2), dv = ssm.size(3);
  const int64_t C = 2 * H * dk + H * dv, K = conv_w.size(1);
  const bool gated = a_w.has_value(), ffn = ffn_in_w.has_value();
  TORCH_CHECK(a_log.has_value() == gated && dt_bias.has_value() == gated, "block_step: a_w, a_log, dt_bias together");
  TORCH_CHECK(ffn_norm_w.has_value() == ffn && ffn_out_w.has_value() == ffn, "block_step: all FFN weights or none");
  check(h, "h", {B, d});
  check(conv_state, "conv_state", {B, K - 1, C});
  check(ssm, "ssm", {B, H, dk, dv});
  check(norm_w, "norm_w", {d});
  check(qkv_w, "qkv_w", {C, d});
  check(conv_w, "conv_w", {C, K});
  check(g_w, "g_w", {H * dv, d});
  check(beta_w, "beta_w", {H, d});
  check(beta_b, "beta_b", {H});
  if (gated) {
    check(*a_w, "a_w", {H, d});
    check(*a_log, "a_log", {H});
    check(*dt_bias, "dt_bias", {H});
  }
  check(head_w, "head_w", {dv});
  check(o_w, "o_w", {d, H * dv});
  const int64_t F = ffn ? ffn_out_w->size(1) : 0;
  if (ffn) {
    check(*ffn_norm_w, "ffn_norm_w", {d});
    check(*ffn_in_w, "ffn_in_w", {2 * F, d});
    check(*ffn_out_w, "ffn_out_w", {d, F});
  }
  const auto opt = h.options();

  // mixer input projections, one parallel pass: qkv | output gate | beta | decay
  Tensor u = at::empty({B, d}, opt);
  rms_norm(ptr(h), ptr(norm_w), static_cast<float>(norm_eps), B, d, u.data_ptr<float>());
  const int64_t P = C + H * dv + H + (gated ? H : 0);
  const int64_t off_g = C, off_beta = C + H * dv, off_a = C + H * dv + H;
  Tensor proj = at::empty({B, P}, opt);
  std::vector<Part> parts{{ptr(qkv_w), C, 0}, {ptr(g_w), H * dv, off_g}, {ptr(beta_w), H, off_beta}};
  if (gated) parts.push_back({ptr(*a_w), H, off_a});
  matvecs(ptr(u), B, d, parts, proj.data_ptr<float>(), P);
  const float* pp = ptr(proj);

  // short causal conv with SiLU over the window (state, x); the new state drops the oldest input
  Tensor conv = at::empty({B, C}, opt), new_conv = at::empty_like(conv_state);
  const float *cs = ptr(conv_state), *cw = ptr(conv_w);
  float *cp = conv.data_ptr<float>(), *ncs = new_conv.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* x = pp + b * P;
    const float* sb = cs + b * (K - 1) * C;
    for (int64_t c = 0; c < C; ++c) {
      float acc = 0;
      for (int64_t j = 0; j < K - 1; ++j) acc += sb[j * C + c] * cw[c * K + j];
      acc += x[c] * cw[c * K + K - 1];
      cp[b * C + c] = silu(acc);
    }
    float* nb = ncs + b * (K - 1) * C;
    if (K > 1) {
      std::copy(sb + C, sb + (K - 1) * C, nb);
      std::copy(x, x + C, nb + (K - 2) * C);
    }
  }

  // per (row, head): L2-normalised q, k; S = a S_old + beta k^T (v - k a S_old); o = scale q S;
  // then the head's RMSNorm times silu(output gate)
  Tensor new_ssm = at::empty_like(ssm), o = at::empty({B, H * dv}, opt);
  const float *so = ptr(ssm), *hw = ptr(head_w), *bb = ptr(beta_b);
  float *sn = new_ssm.data_ptr<float>(), *op = o.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dk));
  std::vector<float> kk(dk), qq(dk), delta(dv);
  for (int64_t b = 0; b < B; ++b) {
    const float* cb = cp + b * C;
    const float* pb = pp + b * P;
    for (int64_t hh = 0; hh < H; ++hh) {
      const float *q = cb + hh * dk, *k = cb + H * dk + hh * dk, *v = cb + 2 * H * dk + hh * dv;
      const float qn = 1.0f / std::max(std::sqrt(dot(q, q, dk)), 1e-12f);
      const float kn = 1.0f / std::max(std::sqrt(dot(k, k, dk)), 1e-12f);
      for (int64_t i = 0; i < dk; ++i) {
        kk[i] = k[i] * kn;
        qq[i] = q[i] * qn * scale;
      }
      const float beta = sigmoid(pb[off_beta + hh] + bb[hh]);
      float a = 1.0f;
      if (gated) a = std::exp(-std::exp(ptr(*a_log)[hh]) * softplus(pb[off_a + hh] + ptr(*dt_bias)[hh]));
      const float* s0 = so + (b * H + hh) * dk * dv;
      float* s = sn + (b * H + hh) * dk * dv;
      for (int64_t e = 0; e < dk * dv; ++e) s[e] = s0[e] * a;
      for (int64_t j = 0; j < dv; ++j) delta[j] = 0;
      for (int64_t i = 0; i < dk; ++i)
        for (int64_t j = 0; j < dv; ++j) delta[j] += kk[i] * s[i * dv + j];
      for (int64_t j = 0; j < dv; ++j) delta[j] = beta * (v[j] - delta[j]);
      float* ob = op + b * H * dv + hh * dv;
      for (int64_t j = 0; j < dv; ++j) ob[j] = 0;
      for (int64_t i = 0; i < dk; ++i) {
        float* si = s + i * dv;
        for (int64_t j = 0; j < dv; ++j) {
          si[j] += kk[i] * delta[j];
          ob[j] += qq[i] * si[j];
        }
      }
      const float r = 1.0f / std::sqrt(dot(ob, ob, dv) / static_cast<float>(dv) + static_cast<float>(head_eps));
      const float* gate = pb + off_g + hh * dv;
      for (int64_t j = 0; j < dv; ++j) ob[j] = ob[j] * r * hw[j] * silu(gate[j]);
    }
  }

  // output projection and residual
  Tensor out = at::empty({B, d}, opt);
  float* hp = out.data_ptr<float>();
  matvecs(op, B, H * dv, {{ptr(o_w), d, 0}}, hp, d);
  const float* h0 = ptr(h);
  for (int64_t e = 0; e < B * d; ++e) hp[e] += h0[e];

  if (ffn) {  // h + W_out (silu(gate) * up) of rmsnorm(h)
    rms_norm(hp, ptr(*ffn_norm_w), static_cast<float>(ffn_eps), B, d, u.data_ptr<float>());
    Tensor z = at::empty({B, 2 * F}, opt), act = at::empty({B, F}, opt), f = at::empty({B, d}, opt);
    matvecs(ptr(u), B, d, {{ptr(*ffn_in_w), 2 * F, 0}}, z.data_ptr<float>(), 2 * F);
    const float* zp = ptr(z);
    float* ap = act.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < F; ++i) ap[b * F + i] = silu(zp[b * 2 * F + i]) * zp[b * 2 * F + F + i];
    matvecs(ap, B, F, {{ptr(*ffn_out_w), d, 0}}, f.data_ptr<float>(), d);
    const float* fp = ptr(f);
    for (int64_t e = 0; e < B * d; ++e) hp[e] += fp[e];
  }
  return {out, new_conv, new_ssm};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
  m.def(
      "block_step(Tensor h, Tensor conv_state, Tensor ssm, Tensor norm_w, Tensor qkv_w, Tensor conv_w, "
      "Tensor g_w, Tensor beta_w, Tensor beta_b, Tensor? a_w, Tensor? a_log, Tensor? dt_bias, Tensor head_w, "
      "Tensor o_w, Tensor? ffn_norm_w, Tensor? ffn_in_w, Tensor? ffn_out_w, float norm_eps, float head_eps, "
      "float ffn_eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) { m.impl("block_step", block_step); }
