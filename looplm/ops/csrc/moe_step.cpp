// One decoding step (T = 1) of a layer's mixture-of-experts FFN with its residual, for B rows, in
// one call: h + MoE(rmsnorm(h)) with top-k routing over SwiGLU experts and an optional shared
// expert. See looplm/layers/layer_step.py for why this exists; looplm/layers/moe.py is the
// reference and the tests compare the two.
#include "simd.h"  // first: it selects ATen's vector instruction set

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

#include "decode.h"

namespace {

using at::Tensor;
using looplm::silu;

const float* ptr(const Tensor& t) { return looplm::fptr(t); }

void check(const Tensor& t, const char* name, std::vector<int64_t> shape) {
  looplm::check_float(t, "moe_step", name, std::move(shape));
}

// y [n] = x [k] W [k, n] (the experts' [in, out] layout), output columns over threads.
void matvec_kn(const float* x, const float* w, int64_t k, int64_t n, float* y) {
  at::parallel_for(0, n, 256, [&](int64_t a, int64_t b) {
    for (int64_t j = a; j < b; ++j) y[j] = 0;
    for (int64_t i = 0; i < k; ++i) {
      const float xi = x[i];
      const float* wi = w + i * n;
      for (int64_t j = a; j < b; ++j) y[j] += xi * wi[j];
    }
  });
}

// y [n] = W [n, k] x [k] (nn.Linear's layout), output rows over threads.
void matvec_nk(const float* x, const float* w, int64_t k, int64_t n, float* y) {
  looplm::matvecs(x, 1, k, {{w, n, 0}}, y, n);
}

// h [B, d]; norm_w [d]; router_w [E, d]; w_in [E, d, 2H] (gate | up); w_out [E, H, d]; shared_in
// [2S, d], shared_out [d, S] (nn.Linear layout; both or none). z = u router_w^T, p = softmax(z),
// the top_k experts by p with weights p (renormalised over the k when renormalize), y = h +
// sum_e w_e SwiGLU_e(u) + shared(u) for u = rmsnorm(h). Returns (y [B, d], load [E] (fraction of
// the B k slots per expert), balance_loss = E sum_e load_e mean_b p_be, z_loss = mean_b
// logsumexp(z_b)^2), as looplm.layers.moe.MoE's aux.
std::vector<Tensor> moe_step(const Tensor& h, const Tensor& norm_w, double eps, const Tensor& router_w,
                             const Tensor& w_in, const Tensor& w_out, const std::optional<Tensor>& shared_in,
                             const std::optional<Tensor>& shared_out, int64_t top_k, bool renormalize) {
  TORCH_CHECK(h.dim() == 2 && w_in.dim() == 3, "moe_step: h [B, d], w_in [E, d, 2H]");
  const int64_t B = h.size(0), d = h.size(1), E = w_in.size(0), H = w_in.size(2) / 2;
  TORCH_CHECK(top_k >= 1 && top_k <= E, "moe_step: top_k must be in 1..E");
  TORCH_CHECK(shared_in.has_value() == shared_out.has_value(), "moe_step: shared_in and shared_out together");
  check(h, "h", {B, d});
  check(norm_w, "norm_w", {d});
  check(router_w, "router_w", {E, d});
  check(w_in, "w_in", {E, d, 2 * H});
  check(w_out, "w_out", {E, H, d});
  const int64_t S = shared_out.has_value() ? shared_out->size(1) : 0;
  if (S) {
    check(*shared_in, "shared_in", {2 * S, d});
    check(*shared_out, "shared_out", {d, S});
  }
  const auto opt = h.options();
  if (B == 0) return {h.clone(), at::zeros({E}, opt), at::zeros({}, opt), at::zeros({}, opt)};
  Tensor y = h.clone(), load = at::zeros({E}, opt), balance = at::zeros({}, opt), zl = at::zeros({}, opt);
  float* yp = y.data_ptr<float>();
  const float *hp = ptr(h), *nw = ptr(norm_w);
  std::vector<float> u(d), z(E), p(E), mean_p(E, 0.0f), hid(2 * std::max(H, S)), act(std::max(H, S)), out(d);
  std::vector<int64_t> order(E);
  float* lp = load.data_ptr<float>();
  double zsum = 0;
  for (int64_t b = 0; b < B; ++b) {
    looplm::rms_norm(hp + b * d, nw, static_cast<float>(eps), 1, d, u.data());
    matvec_nk(u.data(), ptr(router_w), d, E, z.data());
    const float zmax = *std::max_element(z.begin(), z.end());
    float total = 0;
    for (int64_t e = 0; e < E; ++e) total += p[e] = std::exp(z[e] - zmax);
    for (int64_t e = 0; e < E; ++e) {
      p[e] /= total;
      mean_p[e] += p[e] / static_cast<float>(B);
    }
    const double lse = zmax + std::log(static_cast<double>(total));
    zsum += lse * lse;
    // the top_k experts, largest first (ties: lower index first, as a stable sort)
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int64_t a, int64_t c) { return p[a] > p[c] || (p[a] == p[c] && a < c); });
    float wsum = 0;
    for (int64_t j = 0; j < top_k; ++j) wsum += p[order[j]];
    float* yb = yp + b * d;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t e = order[j];
      const float w = renormalize ? p[e] / wsum : p[e];
      lp[e] += 1.0f;
      matvec_kn(u.data(), ptr(w_in) + e * d * 2 * H, d, 2 * H, hid.data());
      for (int64_t i = 0; i < H; ++i) act[i] = silu(hid[i]) * hid[H + i] * w;
      matvec_kn(act.data(), ptr(w_out) + e * H * d, H, d, out.data());
      for (int64_t i = 0; i < d; ++i) yb[i] += out[i];
    }
    if (S) {
      matvec_nk(u.data(), ptr(*shared_in), d, 2 * S, hid.data());
      for (int64_t i = 0; i < S; ++i) act[i] = silu(hid[i]) * hid[S + i];
      matvec_nk(act.data(), ptr(*shared_out), S, d, out.data());
      for (int64_t i = 0; i < d; ++i) yb[i] += out[i];
    }
  }
  float bal = 0;
  for (int64_t e = 0; e < E; ++e) {
    lp[e] /= static_cast<float>(B * top_k);
    bal += lp[e] * mean_p[e];
  }
  balance.fill_(static_cast<double>(E) * bal);
  zl.fill_(zsum / static_cast<double>(B));
  return {y, load, balance, zl};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
  m.def(
      "moe_step(Tensor h, Tensor norm_w, float eps, Tensor router_w, Tensor w_in, Tensor w_out, "
      "Tensor? shared_in, Tensor? shared_out, int top_k, bool renormalize) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) { m.impl("moe_step", moe_step); }
