// One decoding step (T = 1) of a whole pre-norm layer with a fixed-state mixer (DeltaNet / gated
// DeltaNet: delta_layer_step; linear attention, retention, simple GLA, GLA: decay_layer_step) and
// a dense SwiGLU FFN (or none), for B rows, in one call. See looplm/layers/layer_step.py for why
// this exists; the Python layer (looplm/layers/layer.py and mixers.py) is the reference, and the
// tests compare the two. Every matrix-vector product reads each weight row once for all B rows,
// rows split over threads; the rest (norms, short conv, delta-rule update) is a few thousand
// flops per head and runs on the calling thread.
#include "simd.h"  // first: it selects ATen's vector instruction set

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "decode.h"
#include "vec.h"

namespace {

using at::Tensor;
using looplm::dot;

using looplm::add_swiglu_ffn;
using looplm::matvecs;
using looplm::Part;
using looplm::rms_norm;
using looplm::silu;
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // as F.softplus
inline float logsigmoid(float x) { return std::min(x, 0.0f) - std::log1p(std::exp(-std::fabs(x))); }

const float* ptr(const Tensor& t) { return looplm::fptr(t); }

void check(const Tensor& t, const char* name, std::vector<int64_t> shape) {
  looplm::check_float(t, "layer_step", name, std::move(shape));
}

// The parts every fixed-state layer shares: h [B, d]; conv_state [B, K-1, C]; ssm [B, H, dk, dv];
// qkv_w [C, d] with C = 2 H dk + H dv; conv_w [C, K]; g_w [H dv, d] (output gate); head_w [dv];
// o_w [d, H dv]; ffn_norm_w [d], ffn_in_w [2F, d] (gate | up), ffn_out_w [d, F] (all or none).
struct Common {
  const Tensor &h, &conv_state, &ssm, &norm_w, &qkv_w, &conv_w, &g_w, &head_w, &o_w;
  const std::optional<Tensor>&ffn_norm_w, &ffn_in_w, &ffn_out_w;
  double norm_eps, head_eps, ffn_eps;
  int64_t B, d, H, dk, dv, C, K, F;

  void check_all() {
    TORCH_CHECK(h.dim() == 2 && ssm.dim() == 4 && conv_w.dim() == 2, "layer_step: h [B, d], ssm [B, H, dk, dv]");
    B = h.size(0), d = h.size(1), H = ssm.size(1), dk = ssm.size(2), dv = ssm.size(3);
    C = 2 * H * dk + H * dv, K = conv_w.size(1);
    const bool ffn = ffn_in_w.has_value();
    TORCH_CHECK(ffn_norm_w.has_value() == ffn && ffn_out_w.has_value() == ffn, "layer_step: all FFN weights or none");
    check(h, "h", {B, d});
    check(conv_state, "conv_state", {B, K - 1, C});
    check(ssm, "ssm", {B, H, dk, dv});
    check(norm_w, "norm_w", {d});
    check(qkv_w, "qkv_w", {C, d});
    check(conv_w, "conv_w", {C, K});
    check(g_w, "g_w", {H * dv, d});
    check(head_w, "head_w", {dv});
    check(o_w, "o_w", {d, H * dv});
    F = ffn ? ffn_out_w->size(1) : 0;
    if (ffn) {
      check(*ffn_norm_w, "ffn_norm_w", {d});
      check(*ffn_in_w, "ffn_in_w", {2 * F, d});
      check(*ffn_out_w, "ffn_out_w", {d, F});
    }
  }

  // rmsnorm(h), then one parallel pass of the projections qkv | output gate | extra (the mixer's
  // gate inputs, columns from C + H dv on) into proj [B, P]; then the short causal conv with SiLU
  // over the window (state, x) into conv [B, C]; the new conv state drops the oldest input.
  void inputs(const std::vector<Part>& extra, int64_t P, Tensor& proj, Tensor& conv, Tensor& new_conv) {
    const auto opt = h.options();
    Tensor u = at::empty({B, d}, opt);
    rms_norm(ptr(h), ptr(norm_w), static_cast<float>(norm_eps), B, d, u.data_ptr<float>());
    proj = at::empty({B, P}, opt);
    std::vector<Part> parts{{ptr(qkv_w), C, 0}, {ptr(g_w), H * dv, C}};
    parts.insert(parts.end(), extra.begin(), extra.end());
    matvecs(ptr(u), B, d, parts, proj.data_ptr<float>(), P);
    const float *pp = ptr(proj), *cs = ptr(conv_state), *cw = ptr(conv_w);
    conv = at::empty({B, C}, opt), new_conv = at::empty_like(conv_state);
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
  }

  // o [B, H dv] (the state's read-out, changed in place): each head's RMSNorm times silu(output
  // gate), the output projection and the residual, then the FFN and its residual -> h' [B, d].
  Tensor outputs(Tensor& o, const Tensor& proj) {
    const auto opt = h.options();
    const int64_t P = proj.size(1);
    const float *pp = ptr(proj), *hw = ptr(head_w);
    float* op = o.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hh = 0; hh < H; ++hh) {
        float* ob = op + b * H * dv + hh * dv;
        const float r = 1.0f / std::sqrt(dot(ob, ob, dv) / static_cast<float>(dv) + static_cast<float>(head_eps));
        const float* gate = pp + b * P + C + hh * dv;
        for (int64_t j = 0; j < dv; ++j) ob[j] = ob[j] * r * hw[j] * silu(gate[j]);
      }
    }
    Tensor out = at::empty({B, d}, opt);
    float* hp = out.data_ptr<float>();
    matvecs(op, B, H * dv, {{ptr(o_w), d, 0}}, hp, d);
    const float* h0 = ptr(h);
    for (int64_t e = 0; e < B * d; ++e) hp[e] += h0[e];
    if (ffn_in_w.has_value()) add_swiglu_ffn(out, *ffn_norm_w, ffn_eps, *ffn_in_w, *ffn_out_w);
    return out;
  }
};

// DeltaNet / gated DeltaNet: beta_w [H, d], beta_b [H]; a_w [H, d], a_log, dt_bias [H] (gated only).
// Per (row, head): L2-normalised q, k; S = a S_old + beta k^T (v - k a S_old); o = scale q S.
// Returns (h' [B, d], conv_state', ssm').
std::vector<Tensor> delta_layer_step(const Tensor& h, const Tensor& conv_state, const Tensor& ssm,
                                     const Tensor& norm_w, const Tensor& qkv_w, const Tensor& conv_w,
                                     const Tensor& g_w, const Tensor& head_w, const Tensor& o_w,
                                     const std::optional<Tensor>& ffn_norm_w, const std::optional<Tensor>& ffn_in_w,
                                     const std::optional<Tensor>& ffn_out_w, double norm_eps, double head_eps,
                                     double ffn_eps, const Tensor& beta_w, const Tensor& beta_b,
                                     const std::optional<Tensor>& a_w, const std::optional<Tensor>& a_log,
                                     const std::optional<Tensor>& dt_bias) {
  Common m{h, conv_state, ssm, norm_w, qkv_w, conv_w, g_w, head_w, o_w, ffn_norm_w, ffn_in_w, ffn_out_w,
           norm_eps, head_eps, ffn_eps};
  m.check_all();
  const int64_t B = m.B, d = m.d, H = m.H, dk = m.dk, dv = m.dv, C = m.C;
  const bool gated = a_w.has_value();
  TORCH_CHECK(a_log.has_value() == gated && dt_bias.has_value() == gated, "layer_step: a_w, a_log, dt_bias together");
  check(beta_w, "beta_w", {H, d});
  check(beta_b, "beta_b", {H});
  if (gated) {
    check(*a_w, "a_w", {H, d});
    check(*a_log, "a_log", {H});
    check(*dt_bias, "dt_bias", {H});
  }
  const int64_t off_beta = C + H * dv, off_a = off_beta + H, P = off_a + (gated ? H : 0);
  std::vector<Part> extra{{ptr(beta_w), H, off_beta}};
  if (gated) extra.push_back({ptr(*a_w), H, off_a});
  Tensor proj, conv, new_conv;
  m.inputs(extra, P, proj, conv, new_conv);

  Tensor new_ssm = at::empty_like(ssm), o = at::empty({B, H * dv}, h.options());
  const float *pp = ptr(proj), *cp = ptr(conv), *so = ptr(ssm), *bb = ptr(beta_b);
  float *sn = new_ssm.data_ptr<float>(), *op = o.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dk));
  std::vector<float> kk(dk), qq(dk), delta(dv);
  for (int64_t b = 0; b < B; ++b) {
    const float *cb = cp + b * C, *pb = pp + b * P;
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
    }
  }
  return {m.outputs(o, proj), new_conv, new_ssm};
}

// Linear attention, retention, simple GLA, GLA: S = a S_old + k^T v; o = scale q S, with q, k
// through the feature map (0: identity, 1: elu + 1) and the log-decay log(a) from
// - log_gamma [H] (retention: a constant per head), or
// - gk_w [H, d], gk_b [H]: logsigmoid(x gk_w + gk_b) / tau per head (simple GLA), or
// - gk_w [r, d], gk2_w [H dk, r], gk2_b [H dk]: logsigmoid((x gk_w) gk2_w + gk2_b) / tau per key
//   dimension (GLA's low-rank gate),
// or none of them (linear attention, a = 1). Returns (h' [B, d], conv_state', ssm').
std::vector<Tensor> decay_layer_step(const Tensor& h, const Tensor& conv_state, const Tensor& ssm,
                                     const Tensor& norm_w, const Tensor& qkv_w, const Tensor& conv_w,
                                     const Tensor& g_w, const Tensor& head_w, const Tensor& o_w,
                                     const std::optional<Tensor>& ffn_norm_w, const std::optional<Tensor>& ffn_in_w,
                                     const std::optional<Tensor>& ffn_out_w, double norm_eps, double head_eps,
                                     double ffn_eps, int64_t feature, const std::optional<Tensor>& log_gamma,
                                     const std::optional<Tensor>& gk_w, const std::optional<Tensor>& gk_b,
                                     const std::optional<Tensor>& gk2_w, const std::optional<Tensor>& gk2_b,
                                     double tau) {
  Common m{h, conv_state, ssm, norm_w, qkv_w, conv_w, g_w, head_w, o_w, ffn_norm_w, ffn_in_w, ffn_out_w,
           norm_eps, head_eps, ffn_eps};
  m.check_all();
  const int64_t B = m.B, d = m.d, H = m.H, dk = m.dk, dv = m.dv, C = m.C;
  TORCH_CHECK(feature == 0 || feature == 1, "layer_step: feature must be 0 (identity) or 1 (elu + 1)");
  const bool low_rank = gk2_w.has_value(), scalar = gk_w.has_value() && !low_rank;
  TORCH_CHECK(!(log_gamma.has_value() && gk_w.has_value()), "layer_step: log_gamma or gk_w, not both");
  TORCH_CHECK(!low_rank || (gk_w.has_value() && gk2_b.has_value()), "layer_step: gk2_w needs gk_w and gk2_b");
  if (log_gamma.has_value()) check(*log_gamma, "log_gamma", {H});
  const int64_t rank = low_rank ? gk_w->size(0) : H;
  if (gk_w.has_value()) check(*gk_w, "gk_w", {rank, d});
  if (scalar) {
    TORCH_CHECK(gk_b.has_value(), "layer_step: gk_b with gk_w");
    check(*gk_b, "gk_b", {H});
  }
  if (low_rank) {
    check(*gk2_w, "gk2_w", {H * dk, rank});
    check(*gk2_b, "gk2_b", {H * dk});
  }
  const int64_t off_gk = C + H * dv, P = off_gk + (gk_w.has_value() ? rank : 0);
  std::vector<Part> extra;
  if (gk_w.has_value()) extra.push_back({ptr(*gk_w), rank, off_gk});
  Tensor proj, conv, new_conv;
  m.inputs(extra, P, proj, conv, new_conv);

  // log-decays [B, H, dk] (one value per head repeated, or one per key dimension)
  Tensor logdecay = at::zeros({B, H, dk}, h.options());
  float* lg = logdecay.data_ptr<float>();
  const float* pp = ptr(proj);
  const float inv_tau = static_cast<float>(1.0 / tau);
  if (low_rank) {
    Tensor full = at::empty({B, H * dk}, h.options());
    Tensor low = at::empty({B, rank}, h.options());
    float* lp = low.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) std::copy(pp + b * P + off_gk, pp + b * P + off_gk + rank, lp + b * rank);
    matvecs(lp, B, rank, {{ptr(*gk2_w), H * dk, 0}}, full.data_ptr<float>(), H * dk);
    const float *fp = ptr(full), *b2 = ptr(*gk2_b);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t e = 0; e < H * dk; ++e) lg[b * H * dk + e] = logsigmoid(fp[b * H * dk + e] + b2[e]) * inv_tau;
  } else if (scalar || log_gamma.has_value()) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hh = 0; hh < H; ++hh) {
        const float g = scalar ? logsigmoid(pp[b * P + off_gk + hh] + ptr(*gk_b)[hh]) * inv_tau
                               : ptr(*log_gamma)[hh];
        for (int64_t i = 0; i < dk; ++i) lg[(b * H + hh) * dk + i] = g;
      }
  }

  Tensor new_ssm = at::empty_like(ssm), o = at::empty({B, H * dv}, h.options());
  const float *cp = ptr(conv), *so = ptr(ssm);
  float *sn = new_ssm.data_ptr<float>(), *op = o.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dk));
  auto phi = [feature](float x) { return feature == 1 ? (x > 0 ? x + 1.0f : std::exp(x)) : x; };
  std::vector<float> kk(dk), qq(dk);
  for (int64_t b = 0; b < B; ++b) {
    const float* cb = cp + b * C;
    for (int64_t hh = 0; hh < H; ++hh) {
      const float *q = cb + hh * dk, *k = cb + H * dk + hh * dk, *v = cb + 2 * H * dk + hh * dv;
      const float* g = lg + (b * H + hh) * dk;
      for (int64_t i = 0; i < dk; ++i) {
        kk[i] = phi(k[i]);
        qq[i] = phi(q[i]) * scale;
      }
      const float* s0 = so + (b * H + hh) * dk * dv;
      float* s = sn + (b * H + hh) * dk * dv;
      float* ob = op + b * H * dv + hh * dv;
      for (int64_t j = 0; j < dv; ++j) ob[j] = 0;
      for (int64_t i = 0; i < dk; ++i) {
        const float a = std::exp(g[i]);
        const float *s0i = s0 + i * dv;
        float* si = s + i * dv;
        for (int64_t j = 0; j < dv; ++j) {
          si[j] = s0i[j] * a + kk[i] * v[j];
          ob[j] += qq[i] * si[j];
        }
      }
    }
  }
  return {m.outputs(o, proj), new_conv, new_ssm};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
#define LOOPLM_LAYER_COMMON                                                                                 \
  "Tensor h, Tensor conv_state, Tensor ssm, Tensor norm_w, Tensor qkv_w, Tensor conv_w, Tensor g_w, "      \
  "Tensor head_w, Tensor o_w, Tensor? ffn_norm_w, Tensor? ffn_in_w, Tensor? ffn_out_w, float norm_eps, " \
  "float head_eps, float ffn_eps, "
  m.def("delta_layer_step(" LOOPLM_LAYER_COMMON
        "Tensor beta_w, Tensor beta_b, Tensor? a_w, Tensor? a_log, Tensor? dt_bias) -> Tensor[]");
  m.def("decay_layer_step(" LOOPLM_LAYER_COMMON
        "int feature, Tensor? log_gamma, Tensor? gk_w, Tensor? gk_b, Tensor? gk2_w, Tensor? gk2_b, float tau) "
        "-> Tensor[]");
#undef LOOPLM_LAYER_COMMON
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) {
  m.impl("delta_layer_step", delta_layer_step);
  m.impl("decay_layer_step", decay_layer_step);
}
