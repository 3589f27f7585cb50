// T tokens of one sequence through L attention layers in one call: the verification forward of
// self-speculative decoding (looplm/speculative.py), which scores a few draft tokens at once.
// The same layers as attn_stack_step (attn_step.cpp) with batch 1 and T rows instead of one: each
// projection multiplies all T rows with its weights read once (qmatvec.h), each layer's cache gets
// the T new keys and values in slots S .. S + T - 1 of its buffer, and row t attends to slots
// 0 .. S + t (causal among the new tokens). Float32 caches only.
#include "simd.h"  // first: it selects ATen's vector instruction set

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "decode.h"

// Fortran BLAS (MKL), exported by libtorch_cpu
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

using at::Tensor;

// qkv [T, R, D] (R = H + 2 Hkv): q and k heads rotated by their row's position (RoPE, "rotate
// half" pairs (j, j + D/2), frequencies f [D/2]).
void rotate(float* qkv, int64_t T, int64_t R, int64_t rotated, int64_t half, const float* f, const int64_t* pos) {
  const int64_t D = 2 * half;
  std::vector<float> c(half), s(half);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < half; ++j) {
      const float angle = static_cast<float>(pos[t]) * f[j];
      c[j] = std::cos(angle);
      s[j] = std::sin(angle);
    }
    for (int64_t r = 0; r < rotated; ++r) {
      float* x = qkv + (t * R + r) * D;
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = x[j], x2 = x[half + j];
        x[j] = x1 * c[j] - x2 * s[j];
        x[half + j] = x2 * c[j] + x1 * s[j];
      }
    }
  }
}

// o [T, H, D] = causal attention of the queries in qkv [T, R, D] over keys k, values v (rows of
// Hkv D floats, slot stride ld), n = S + T slots: row t sees slots 0 .. S + t. One BLAS product
// per key head for the T x group query rows that share it.
void attend_rows(const float* qkv, const float* k, const float* v, int64_t T, int64_t R, int64_t H, int64_t Hkv,
                 int64_t D, int64_t n, float* o) {
  const int64_t group = H / Hkv, M = T * group, S = n - T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D)), fzero = 0.0f, fone = 1.0f;
  const int Di = static_cast<int>(D), Mi = static_cast<int>(M), ni = static_cast<int>(n),
            ld = static_cast<int>(Hkv * D);
  const char tr = 'T', no = 'N';
  at::parallel_for(0, Hkv, 1, [&](int64_t a, int64_t e) {
    std::vector<float> q(static_cast<size_t>(M * D)), p(static_cast<size_t>(M * n)), out(static_cast<size_t>(M * D));
    for (int64_t hk = a; hk < e; ++hk) {
      for (int64_t t = 0; t < T; ++t)  // the group's query heads of row t are adjacent
        std::copy_n(qkv + (t * R + hk * group) * D, group * D, q.data() + t * group * D);
      sgemm_(&tr, &no, &ni, &Mi, &Di, &scale, k + hk * D, &ld, q.data(), &Di, &fzero, p.data(), &ni);
      for (int64_t m = 0; m < M; ++m) {
        float* row = p.data() + m * n;
        const int64_t seen = S + m / group + 1;
        const float top = *std::max_element(row, row + seen);
        float total = 0.0f;
        for (int64_t j = 0; j < seen; ++j) total += row[j] = std::exp(row[j] - top);
        const float inv = 1.0f / total;
        for (int64_t j = 0; j < seen; ++j) row[j] *= inv;
        std::fill(row + seen, row + n, 0.0f);
      }
      sgemm_(&no, &no, &Di, &Mi, &ni, &fone, v + hk * D, &ld, p.data(), &ni, &fzero, out.data(), &Di);
      for (int64_t t = 0; t < T; ++t)
        std::copy_n(out.data() + t * group * D, group * D, o + (t * H + hk * group) * D);
    }
  });
}

// h [T, d] (T tokens of one sequence); w, eps, inv_freq, n_heads, n_kv_heads: as attn_stack_step;
// positions [T] long; caches: per layer its float32 buffers k, v [1, C, Hkv, D], key_mask [1, C]
// bool, pos [1, C] long, of which lengths[l] slots are in use (all seen: the caller checks), with
// C >= lengths[l] + T. -> h after the L layers [T, d]; the caches hold the T new slots.
Tensor attn_stack_verify(const Tensor& h, const c10::List<std::optional<Tensor>>& w, at::ArrayRef<double> eps,
                         const Tensor& inv_freq, const Tensor& positions, int64_t n_heads, int64_t n_kv_heads,
                         at::TensorList caches, at::IntArrayRef lengths) {
  const int64_t L = static_cast<int64_t>(lengths.size());
  TORCH_CHECK(h.dim() == 2 && inv_freq.dim() == 1, "attn_stack_verify: h [T, d], inv_freq [D/2]");
  TORCH_CHECK(static_cast<int64_t>(w.size()) == looplm::kSlots * L && static_cast<int64_t>(eps.size()) == 2 * L &&
                  static_cast<int64_t>(caches.size()) == 4 * L,
              "attn_stack_verify: ", looplm::kSlots, " weights, 2 eps and 4 cache buffers per layer");
  const int64_t T = h.size(0), d = h.size(1), half = inv_freq.size(0), D = 2 * half, H = n_heads, Hkv = n_kv_heads;
  const int64_t R = H + 2 * Hkv;
  TORCH_CHECK(H % Hkv == 0, "attn_stack_verify: n_heads must be a multiple of n_kv_heads");
  looplm::check_float(h, "attn_stack_verify", "h", {T, d});
  looplm::check_float(inv_freq, "attn_stack_verify", "inv_freq", {half});
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == T,
              "attn_stack_verify: positions must be a long tensor [T]");
  const Tensor pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  Tensor x = h.clone(), y = at::empty_like(h);
  std::vector<float> u(static_cast<size_t>(T * d)), qkv(static_cast<size_t>(T * R * D)),
      o(static_cast<size_t>(T * H * D));
  for (int64_t l = 0; l < L; ++l) {
    const int64_t base = looplm::kSlots * l, S = lengths[l];
    const Tensor &k = caches[4 * l], &v = caches[4 * l + 1], &km = caches[4 * l + 2], &kp = caches[4 * l + 3];
    TORCH_CHECK(k.scalar_type() == at::kFloat && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() &&
                    k.dim() == 4 && k.size(0) == 1 && k.size(2) == Hkv && k.size(3) == D && S >= 0 &&
                    S + T <= k.size(1),
                "attn_stack_verify: layer ", l, "'s k, v buffers must be contiguous float32 [1, C, Hkv, D] with "
                "C >= length + T");
    TORCH_CHECK(km.scalar_type() == at::kBool && kp.scalar_type() == at::kLong && km.is_contiguous() &&
                    kp.is_contiguous() && km.sizes() == kp.sizes() && km.size(1) == k.size(1),
                "attn_stack_verify: layer ", l, "'s key_mask (bool) and pos (long) buffers must be [1, C]");
    const std::optional<Tensor> norm_w = w.get(base), ffn_norm_w = w.get(base + 7);
    TORCH_CHECK(norm_w.has_value(), "attn_stack_verify: layer ", l, " has no mixer norm");
    looplm::check_float(*norm_w, "attn_stack_verify", "norm_w", {d});
    const looplm::QWeight Wqkv = looplm::qweight(looplm::parts_at(w, base + 1), R * D, d, "attn_stack_verify: qkv");
    const looplm::QWeight O = looplm::qweight(looplm::parts_at(w, base + 4), d, H * D, "attn_stack_verify: o");
    looplm::rms_norm(x.data_ptr<float>(), norm_w->data_ptr<float>(), static_cast<float>(eps[2 * l]), T, d, u.data());
    looplm::qmatvecs(u.data(), T, d, {Wqkv}, {0}, qkv.data(), R * D);
    rotate(qkv.data(), T, R, H + Hkv, half, inv_freq.data_ptr<float>(), pp);
    float *kb = k.data_ptr<float>(), *vb = v.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {  // the append: slots S .. S + T - 1
      const float* src = qkv.data() + t * R * D;
      std::copy(src + H * D, src + (H + Hkv) * D, kb + (S + t) * Hkv * D);
      std::copy(src + (H + Hkv) * D, src + R * D, vb + (S + t) * Hkv * D);
      km.data_ptr<bool>()[S + t] = true;
      kp.data_ptr<int64_t>()[S + t] = pp[t];
    }
    attend_rows(qkv.data(), kb, vb, T, R, H, Hkv, D, S + T, o.data());
    float* yp = y.data_ptr<float>();
    looplm::qmatvecs(o.data(), T, H * D, {O}, {0}, yp, d);
    const float* xp = x.data_ptr<float>();
    for (int64_t i = 0; i < T * d; ++i) yp[i] += xp[i];
    if (ffn_norm_w.has_value()) {
      looplm::check_float(*ffn_norm_w, "attn_stack_verify", "ffn_norm_w", {d});
      const std::vector<Tensor> out_parts = looplm::parts_at(w, base + 11);
      TORCH_CHECK(!out_parts.empty() && out_parts[0].dim() == 2, "attn_stack_verify: FFN out weight missing");
      const int64_t F = out_parts.size() == 3 ? 2 * out_parts[0].size(1) : out_parts[0].size(1);
      looplm::add_swiglu_ffn(y, *ffn_norm_w, eps[2 * l + 1],
                             looplm::qweight(looplm::parts_at(w, base + 8), 2 * F, d, "attn_stack_verify: ffn_in"),
                             looplm::qweight(out_parts, d, F, "attn_stack_verify: ffn_out"));
    }
    std::swap(x, y);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
  m.def(
      "attn_stack_verify(Tensor h, Tensor?[] w, float[] eps, Tensor inv_freq, Tensor positions, int n_heads, "
      "int n_kv_heads, Tensor(a!)[] caches, int[] lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) { m.impl("attn_stack_verify", attn_stack_verify); }
