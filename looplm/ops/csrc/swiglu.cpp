// The SwiGLU activation silu(gate) * up (* a weight per row) over rows of float32, forward and
// backward in one vectorised pass per row, rows split over threads. See looplm/layers/ffn.py for
// why this exists; its PyTorch form is the reference and the tests compare the two.
#include "simd.h"  // first: it selects ATen's vector instruction set

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using looplm::Vec;

constexpr int64_t kGrain = 8;  // rows per task at least

inline float sigmoid1(float x) { return 1.0f / (1.0f + std::exp(-x)); }

void check(const Tensor& h, const std::optional<Tensor>& w) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0 && h.scalar_type() == at::kFloat && h.is_contiguous() &&
                  h.device().is_cpu(),
              "swiglu: h must be a contiguous float32 CPU tensor [N, 2H]");
  if (w.has_value()) {
    TORCH_CHECK(w->dim() == 1 && w->size(0) == h.size(0) && w->scalar_type() == at::kFloat && w->is_contiguous(),
                "swiglu: weight must be a contiguous float32 tensor [N]");
  }
}

// h [N, 2H] = gate | up, weight [N] or None -> y [N, H] = silu(gate) * up (* weight)
Tensor swiglu_forward(const Tensor& h, const std::optional<Tensor>& weight) {
  check(h, weight);
  const int64_t n = h.size(0), H = h.size(1) / 2;
  Tensor y = at::empty({n, H}, h.options());
  const float* hp = h.data_ptr<float>();
  const float* wp = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const float *g = hp + i * 2 * H, *u = g + H;
      float* yi = yp + i * H;
      looplm::silu_mul(g, u, wp ? wp[i] : 1.0f, H, yi);
    }
  });
  return y;
}

// gy [N, H], h [N, 2H], weight [N] or None -> (gh [N, 2H], gw [N] (empty unless need_w)), with
// s = sigmoid(gate): d_up = gy w silu(gate), d_gate = gy w up s (1 + gate (1 - s)),
// gw = sum_j gy silu(gate) up. silu(gate) is recomputed, not saved.
std::vector<Tensor> swiglu_backward(const Tensor& gy, const Tensor& h, const std::optional<Tensor>& weight,
                                    bool need_w) {
  check(h, weight);
  const int64_t n = h.size(0), H = h.size(1) / 2, V = Vec::size();
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == n && gy.size(1) == H && gy.scalar_type() == at::kFloat &&
                  gy.is_contiguous(),
              "swiglu: gy must be a contiguous float32 tensor [N, H]");
  need_w = need_w && weight.has_value();
  Tensor gh = at::empty_like(h), gw = at::empty({need_w ? n : 0}, h.options());
  const float *hp = h.data_ptr<float>(), *gp = gy.data_ptr<float>();
  const float* wp = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  float *ghp = gh.data_ptr<float>(), *gwp = need_w ? gw.data_ptr<float>() : nullptr;
  at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
    const Vec one(1.0f);
    for (int64_t i = a; i < b; ++i) {
      const float *g = hp + i * 2 * H, *u = g + H, *gi = gp + i * H;
      float *dg = ghp + i * 2 * H, *du = dg + H;
      const float wi = wp ? wp[i] : 1.0f;
      Vec acc(0.0f);
      float tail = 0;
      int64_t j = 0;
      for (; j + V <= H; j += V) {
        const Vec gv = Vec::loadu(g + j), uv = Vec::loadu(u + j), gyv = Vec::loadu(gi + j);
        const Vec s = looplm::sigmoid(gv), act = gv * s, gw_ = gyv * Vec(wi);
        (gw_ * act).store(du + j);
        (gw_ * uv * s * (one + gv * (one - s))).store(dg + j);
        if (gwp) acc = acc + gyv * act * uv;
      }
      for (; j < H; ++j) {
        const float s = sigmoid1(g[j]), act = g[j] * s, gw_ = gi[j] * wi;
        du[j] = gw_ * act;
        dg[j] = gw_ * u[j] * s * (1.0f + g[j] * (1.0f - s));
        tail += gi[j] * act * u[j];
      }
      if (gwp) {
        float lanes[Vec::size()];
        acc.store(lanes);
        for (int64_t l = 0; l < V; ++l) tail += lanes[l];
        gwp[i] = tail;
      }
    }
  });
  return {gh, gw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
  m.def("swiglu_forward(Tensor h, Tensor? weight) -> Tensor");
  m.def("swiglu_backward(Tensor gy, Tensor h, Tensor? weight, bool need_w) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) {
  m.impl("swiglu_forward", swiglu_forward);
  m.impl("swiglu_backward", swiglu_backward);
}
