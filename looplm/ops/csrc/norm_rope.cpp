// RMSNorm (forward, backward; optionally times silu(gate)) and the RoPE rotation over rows of
// float32 tensors, one pass over each row with the rows split over threads. See looplm/layers/norms.py and
// looplm/ops/attention.py for why these exist; their PyTorch forms are the reference and the
// tests compare the two.
#include "simd.h"  // first: it selects ATen's vector instruction set

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

constexpr int64_t kGrain = 16;  // rows per task at least

// out[j] = sigmoid(z[j]) for j < d
void sigmoid_row(const float* z, int64_t d, float* out) {
  const int64_t V = looplm::Vec::size();
  int64_t j = 0;
  for (; j + V <= d; j += V) looplm::sigmoid(looplm::Vec::loadu(z + j)).store(out + j);
  for (; j < d; ++j) out[j] = 1.0f / (1.0f + std::exp(-z[j]));
}

void check_rows(const Tensor& t, const char* name, int64_t d) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == d && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.device().is_cpu(),
              "rms_norm: ", name, " must be a contiguous float32 CPU tensor [N, ", d, "]");
}

// x [N, D], w [D], gate z [N, D] or None -> (y = x * r * w (* silu(z)) [N, D],
// r = rsqrt(mean(x^2) + eps) [N, 1])
std::vector<Tensor> rms_norm_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& gate,
                                     double eps) {
  const int64_t d = w.numel();
  check_rows(x, "x", d);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 1, "rms_norm: w [D] float32");
  if (gate.has_value()) check_rows(*gate, "gate", d);
  const int64_t n = x.size(0);
  Tensor y = at::empty_like(x), r = at::empty({n, 1}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* zp = gate.has_value() ? gate->data_ptr<float>() : nullptr;
  float *yp = y.data_ptr<float>(), *rp = r.data_ptr<float>();
  const float e = static_cast<float>(eps), inv_d = 1.0f / static_cast<float>(d);
  at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
    std::vector<float> sig(zp ? d : 0);
    for (int64_t i = a; i < b; ++i) {
      const float* xi = xp + i * d;
      float* yi = yp + i * d;
      const float ri = 1.0f / std::sqrt(dot(xi, xi, d) * inv_d + e);
      rp[i] = ri;
      for (int64_t j = 0; j < d; ++j) yi[j] = xi[j] * ri * wp[j];
      if (zp) {
        const float* zi = zp + i * d;
        sigmoid_row(zi, d, sig.data());
        for (int64_t j = 0; j < d; ++j) yi[j] *= zi[j] * sig[j];
      }
    }
  });
  return {y, r};
}

// gy, x [N, D], r [N, 1], w [D], gate z [N, D] or None -> (gx [N, D], gw [D] (empty unless
// need_w), gz [N, D] (empty without a gate)): n = x r, g = gy silu(z), gz = gy n w silu'(z),
// gn = g w, gx = r (gn - n mean(gn n)), gw = sum_rows g n.
std::vector<Tensor> rms_norm_backward(const Tensor& gy, const Tensor& x, const Tensor& r, const Tensor& w,
                                      const std::optional<Tensor>& gate, bool need_w) {
  const int64_t d = w.numel();
  check_rows(gy, "gy", d);
  check_rows(x, "x", d);
  check_rows(r, "r", 1);
  if (gate.has_value()) check_rows(*gate, "gate", d);
  const int64_t n = x.size(0);
  TORCH_CHECK(gy.size(0) == n && r.size(0) == n && (!gate.has_value() || gate->size(0) == n),
              "rms_norm: gy, x, r, gate must have the same rows");
  Tensor gx = at::empty_like(x);
  Tensor gz = gate.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  const float *gp = gy.data_ptr<float>(), *xp = x.data_ptr<float>(), *rp = r.data_ptr<float>(),
              *wp = w.data_ptr<float>();
  const float* zp = gate.has_value() ? gate->data_ptr<float>() : nullptr;
  float *gxp = gx.data_ptr<float>(), *gzp = zp ? gz.data_ptr<float>() : nullptr;
  // gw in fixed tiles of rows, summed in order: the same bits for any number of threads (a
  // resumed run on another thread count must reproduce an uninterrupted one)
  constexpr int64_t kRowsPerSum = 64;
  const int64_t tiles = (n + kRowsPerSum - 1) / kRowsPerSum;
  std::vector<float> partial(need_w ? static_cast<size_t>(tiles) * d : 0, 0.0f);
  const float inv_d = 1.0f / static_cast<float>(d);
  at::parallel_for(0, tiles, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> sig(zp ? d : 0), gated(zp ? d : 0);
    for (int64_t tile = b0; tile < b1; ++tile) {
      float* acc = need_w ? partial.data() + static_cast<size_t>(tile) * d : nullptr;
      for (int64_t i = tile * kRowsPerSum; i < std::min(n, (tile + 1) * kRowsPerSum); ++i) {
        const float *gi = gp + i * d, *xi = xp + i * d;
        const float ri = rp[i];
        if (zp) {  // g = gy silu(z); gz = gy (n w) silu'(z), silu' = s (1 + z (1 - s))
          const float* zi = zp + i * d;
          float* gzi = gzp + i * d;
          sigmoid_row(zi, d, sig.data());
          for (int64_t j = 0; j < d; ++j) {
            const float sj = sig[j];
            gzi[j] = gi[j] * xi[j] * ri * wp[j] * sj * (1.0f + zi[j] * (1.0f - sj));
            gated[j] = gi[j] * zi[j] * sj;
          }
          gi = gated.data();
        }
        float m = 0;
        for (int64_t j = 0; j < d; ++j) m += gi[j] * wp[j] * xi[j];
        m *= ri * inv_d;  // mean(gn n) = r mean(gn x)
        float* gxi = gxp + i * d;
        for (int64_t j = 0; j < d; ++j) gxi[j] = ri * (gi[j] * wp[j] - xi[j] * ri * m);
        if (acc) {
          for (int64_t j = 0; j < d; ++j) acc[j] += gi[j] * xi[j] * ri;
        }
      }
    }
  });
  Tensor gw = at::zeros({need_w ? d : 0}, x.options());
  if (need_w) {
    float* gwp = gw.data_ptr<float>();
    for (int64_t tile = 0; tile < tiles; ++tile)
      for (int64_t j = 0; j < d; ++j) gwp[j] += partial[static_cast<size_t>(tile) * d + j];
  }
  return {gx, gw, gz};
}

// x [B, T, H, D] (last dim contiguous, any other strides), cos, sin [B or 1, T, 1, D/2]
// contiguous -> out [B, T, H, D] contiguous: (x1 cos - sign x2 sin, x2 cos + sign x1 sin) for the
// halves x1, x2 of the last dim. sign = -1 rotates back (the backward).
Tensor rope_rotate(const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t sign) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.stride(3) == 1 && x.device().is_cpu(),
              "rope_rotate: x must be a float32 CPU tensor [B, T, H, D] with a contiguous last dim");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), h = D / 2;
  TORCH_CHECK(D % 2 == 0, "rope_rotate: D must be even");
  for (const Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 4 && (t->size(0) == B || t->size(0) == 1) && t->size(1) == T && t->size(2) == 1 &&
                    t->size(3) == h && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "rope_rotate: cos, sin must be contiguous float32 [B or 1, T, 1, D/2]");
  }
  Tensor out = at::empty({B, T, H, D}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  const bool per_row = cos.size(0) == B && B > 1;
  const float s = static_cast<float>(sign);
  at::parallel_for(0, B * T, kGrain, [&](int64_t a, int64_t e) {
    for (int64_t bt = a; bt < e; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const int64_t table = ((per_row ? b : 0) * T + t) * h;
      const float *c = cp + table, *sn = sp + table;
      for (int64_t k = 0; k < H; ++k) {
        const float* xi = xp + b * sb + t * st + k * sh;
        float* oi = op + (bt * H + k) * D;
        for (int64_t j = 0; j < h; ++j) {
          const float x1 = xi[j], x2 = xi[h + j];
          oi[j] = x1 * c[j] - s * x2 * sn[j];
          oi[h + j] = x2 * c[j] + s * x1 * sn[j];
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
  m.def("rms_norm_forward(Tensor x, Tensor w, Tensor? gate, float eps) -> Tensor[]");
  m.def("rms_norm_backward(Tensor gy, Tensor x, Tensor r, Tensor w, Tensor? gate, bool need_w) -> Tensor[]");
  m.def("rope_rotate(Tensor x, Tensor cos, Tensor sin, int sign) -> Tensor");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) {
  m.impl("rms_norm_forward", rms_norm_forward);
  m.impl("rms_norm_backward", rms_norm_backward);
  m.impl("rope_rotate", rope_rotate);
}
