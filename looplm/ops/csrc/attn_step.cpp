// One decoding step (T = 1) of a pre-norm block with softmax attention, for B rows, in two calls
// around the cache append (looplm/layers/kv_cache.py): attn_step_in (norm, q|k|v projection,
// RoPE) and attn_step_out (attention over the whole cache, output projection, residual, dense
// SwiGLU FFN or none). Weights are lists of parts in any of qmatvec.h's formats (float32, int8,
// int4). See looplm/layers/layer_step.py for why this exists; the Python block is the reference and
// the tests compare the two.
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

// Fortran BLAS (MKL), exported by libtorch_cpu; called from within the threads of parallel_for
extern "C" void sgemv_(const char* trans, const int* m, const int* n, const float* alpha, const float* a,
                       const int* lda, const float* x, const int* incx, const float* beta, float* y,
                       const int* incy);

namespace {

using at::Tensor;

const float* ptr(const Tensor& t) { return looplm::fptr(t); }

void check(const Tensor& t, const char* name, std::vector<int64_t> shape) {
  looplm::check_float(t, "attn_step", name, std::move(shape));
}

// h [B, d], norm_w [d], qkv_w: parts of [(H + 2 Hkv) D, d], inv_freq [D/2] (RoPE frequencies, as
// looplm.ops.attention.rope_cos_sin computes them), positions [B] long -> qkv [B, H + 2 Hkv, D]:
// q and k rotated by their row's position ("rotate half" pairs (i, i + D/2)), v as projected.
Tensor attn_step_in(const Tensor& h, const Tensor& norm_w, double eps, at::TensorList qkv_w, const Tensor& inv_freq,
                    const Tensor& positions, int64_t n_heads, int64_t n_kv_heads) {
  TORCH_CHECK(h.dim() == 2 && inv_freq.dim() == 1, "attn_step: h [B, d], inv_freq [D/2]");
  const int64_t B = h.size(0), d = h.size(1), half = inv_freq.size(0), D = 2 * half;
  const int64_t R = n_heads + 2 * n_kv_heads, rotated = n_heads + n_kv_heads;
  check(h, "h", {B, d});
  check(norm_w, "norm_w", {d});
  const looplm::QWeight W = looplm::qweight(qkv_w.vec(), R * D, d, "attn_step: qkv_w");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == B,
              "attn_step: positions must be a long tensor [B]");
  Tensor u = at::empty({B, d}, h.options()), qkv = at::empty({B, R, D}, h.options());
  looplm::rms_norm(ptr(h), ptr(norm_w), static_cast<float>(eps), B, d, u.data_ptr<float>());
  float* out = qkv.data_ptr<float>();
  looplm::qmatvecs(ptr(u), B, d, {W}, {0}, out, R * D);
  const Tensor pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const float* f = ptr(inv_freq);
  std::vector<float> c(half), s(half);
  for (int64_t b = 0; b < B; ++b) {
    const float p = static_cast<float>(pp[b]);
    for (int64_t j = 0; j < half; ++j) {
      const float angle = p * f[j];
      c[j] = std::cos(angle);
      s[j] = std::sin(angle);
    }
    for (int64_t r = 0; r < rotated; ++r) {
      float* x = out + (b * R + r) * D;
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = x[j], x2 = x[half + j];
        x[j] = x1 * c[j] - x2 * s[j];
        x[half + j] = x2 * c[j] + x1 * s[j];
      }
    }
  }
  return qkv;
}

// h [B, d] (the block's input), q [B, H, D], k, v [B, S, Hkv, D] (the cache after the append,
// last dim contiguous: views of its buffer), o_w: parts of [d, H D]; ffn_norm_w [d], ffn_in_w:
// parts of [2F, d], ffn_out_w: of [d, F] (all or none: None and empty lists); starts [B] long or None
// (zeros) -> h + o_proj(softmax(q k^T / sqrt(D)) v) (+ the FFN). Row b's query sees its keys from
// slot starts[b] on (the slots before it are unused: a batch of caches of different lengths padded
// at the front); the caller checks that no seen slot is masked or holds a later position. Query
// head i reads key/value head i / (H / Hkv) (grouped heads).
Tensor attn_step_out(const Tensor& h, const Tensor& q, const Tensor& k, const Tensor& v, at::TensorList o_w,
                     const std::optional<Tensor>& ffn_norm_w, at::TensorList ffn_in_w, at::TensorList ffn_out_w,
                     double ffn_eps, const std::optional<Tensor>& starts) {
  TORCH_CHECK(h.dim() == 2 && q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(),
              "attn_step: h [B, d], q [B, H, D], k, v [B, S, Hkv, D]");
  const int64_t B = h.size(0), d = h.size(1), H = q.size(1), D = q.size(2), S = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && S > 0 && H % Hkv == 0, "attn_step: k, v must be [B, S, Hkv, D]");
  for (const Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->stride(3) == 1 && t->stride(2) == D && t->device().is_cpu(),
                "attn_step: k, v must be float32 CPU tensors with contiguous heads");
  }
  check(h, "h", {B, d});
  check(q, "q", {B, H, D});
  const looplm::QWeight O = looplm::qweight(o_w.vec(), d, H * D, "attn_step: o_w");
  std::vector<int64_t> first(B, 0);  // each row's first seen slot
  if (starts.has_value()) {
    TORCH_CHECK(starts->scalar_type() == at::kLong && starts->dim() == 1 && starts->size(0) == B,
                "attn_step: starts must be a long tensor [B]");
    const Tensor st = starts->contiguous();
    for (int64_t b = 0; b < B; ++b) {
      first[b] = st.data_ptr<int64_t>()[b];
      TORCH_CHECK(first[b] >= 0 && first[b] < S, "attn_step: starts must be in [0, S)");
    }
  }
  const bool ffn = !ffn_in_w.empty();
  TORCH_CHECK(ffn_norm_w.has_value() == ffn && ffn_out_w.empty() != ffn, "attn_step: all FFN weights or none");
  const auto opt = h.options();
  Tensor o = at::empty({B, H, D}, opt);
  const float *qp = ptr(q), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = o.data_ptr<float>();
  const int64_t ksb = k.stride(0), kss = k.stride(1), vsb = v.stride(0), vss = v.stride(1), group = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // The cache is read in blocks of keys over threads, once for q k^T and once for p v, with one
  // BLAS gemv per head and block (hand-written dot products per key ran 1.5-3x slower than SDPA
  // at 8192-16384 keys); the blocks' partial outputs are summed in block order.
  using looplm::Vec;
  const int64_t V = Vec::size();
  constexpr int64_t kKeys = 256;  // keys per block
  const int64_t blocks = (S + kKeys - 1) / kKeys, BH = B * H;
  std::vector<float> score(static_cast<size_t>(BH) * S), partial(static_cast<size_t>(blocks) * BH * D, 0.0f);
  const int Di = static_cast<int>(D), ks = static_cast<int>(kss), vs = static_cast<int>(vss), inc = 1;
  const char tr = 'T', no = 'N';
  const float fzero = 0.0f, fone = 1.0f;
  at::parallel_for(0, blocks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {  // scores of a block of keys: BLAS gemv per head
      const int64_t t0 = c * kKeys;
      const int nk = static_cast<int>(std::min(S, t0 + kKeys) - t0);
      for (int64_t bh = 0; bh < BH; ++bh) {
        const int64_t b = bh / H, hk = (bh % H) / group, lo = std::max(t0, first[b]);
        const int n = nk - static_cast<int>(lo - t0);
        if (n <= 0) continue;
        sgemv_(&tr, &Di, &n, &scale, kp + b * ksb + lo * kss + hk * D, &ks, qp + bh * D, &inc, &fzero,
               score.data() + bh * S + lo, &inc);
      }
    }
  });
  at::parallel_for(0, BH, 1, [&](int64_t a, int64_t e) {  // softmax of each row of scores
    for (int64_t bh = a; bh < e; ++bh) {
      const int64_t n = S - first[bh / H];
      float* sc = score.data() + bh * S + first[bh / H];
      const float top = *std::max_element(sc, sc + n);
      int64_t t = 0;
      for (; t + V <= n; t += V) (Vec::loadu(sc + t) - Vec(top)).exp().store(sc + t);
      for (; t < n; ++t) sc[t] = std::exp(sc[t] - top);
      float total = 0;
      for (t = 0; t < n; ++t) total += sc[t];
      const float inv = 1.0f / total;
      for (t = 0; t < n; ++t) sc[t] *= inv;
    }
  });
  at::parallel_for(0, blocks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {  // p v of a block of keys: BLAS gemv per head
      const int64_t t0 = c * kKeys;
      const int nk = static_cast<int>(std::min(S, t0 + kKeys) - t0);
      float* part = partial.data() + c * BH * D;
      for (int64_t bh = 0; bh < BH; ++bh) {
        const int64_t b = bh / H, hk = (bh % H) / group, lo = std::max(t0, first[b]);
        const int n = nk - static_cast<int>(lo - t0);
        if (n <= 0) continue;  // its part stays zero
        sgemv_(&no, &Di, &n, &fone, vp + b * vsb + lo * vss + hk * D, &vs, score.data() + bh * S + lo, &inc,
               &fzero, part + bh * D, &inc);
      }
    }
  });
  for (int64_t i = 0; i < BH * D; ++i) op[i] = 0;
  for (int64_t c = 0; c < blocks; ++c)
    for (int64_t i = 0; i < BH * D; ++i) op[i] += partial[c * BH * D + i];
  Tensor out = at::empty({B, d}, opt);
  float* hp = out.data_ptr<float>();
  looplm::qmatvecs(op, B, H * D, {O}, {0}, hp, d);
  const float* h0 = ptr(h);
  for (int64_t i = 0; i < B * d; ++i) hp[i] += h0[i];
  if (ffn) {
    check(*ffn_norm_w, "ffn_norm_w", {d});
    TORCH_CHECK(ffn_out_w[0].dim() == 2, "attn_step: ffn_out_w must start with a matrix");
    const int64_t F = ffn_out_w.size() == 3 ? 2 * ffn_out_w[0].size(1) : ffn_out_w[0].size(1);
    looplm::add_swiglu_ffn(out, *ffn_norm_w, ffn_eps, looplm::qweight(ffn_in_w.vec(), 2 * F, d, "attn_step: ffn_in_w"),
                           looplm::qweight(ffn_out_w.vec(), d, F, "attn_step: ffn_out_w"));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
  m.def(
      "attn_step_in(Tensor h, Tensor norm_w, float eps, Tensor[] qkv_w, Tensor inv_freq, Tensor positions, "
      "int n_heads, int n_kv_heads) -> Tensor");
  m.def(
      "attn_step_out(Tensor h, Tensor q, Tensor k, Tensor v, Tensor[] o_w, Tensor? ffn_norm_w, Tensor[] ffn_in_w, "
      "Tensor[] ffn_out_w, float ffn_eps, Tensor? starts=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) {
  m.impl("attn_step_in", attn_step_in);
  m.impl("attn_step_out", attn_step_out);
}
