// One decoding step (T = 1) of a pre-norm layer with softmax attention, for B rows, in two calls
// around the cache append (looplm/layers/kv_cache.py): attn_step_in (norm, q|k|v projection,
// RoPE) and attn_step_out (attention over the whole cache, output projection, residual, dense
// SwiGLU FFN or none). Weights are lists of parts in any of qmatvec.h's formats (float32, int8,
// int4). attn_step_out also reads a cache held as int8 codes with one float32 scale per cached
// row (slot and key head; looplm/ops/kv_quant.py), dequantising a chunk of rows at a time. See
// looplm/layers/layer_step.py for why this exists; the Python layer is the reference and the
// tests compare the two.
#include "simd.h"  // first: it selects ATen's vector instruction set

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "attend_chunk.h"
#include "decode.h"
#include "liger.h"

namespace {

using at::Tensor;

const float* ptr(const Tensor& t) { return looplm::fptr(t); }

void check(const Tensor& t, const char* name, std::vector<int64_t> shape) {
  looplm::check_float(t, "attn_step", name, std::move(shape));
}

// u = rmsnorm(h) [B, d] -> out [B, H + 2 Hkv, D] = u W_qkv^T with q and k rotated by their row's
// position (RoPE, "rotate half" pairs (i, i + D/2); not when !rotate); f: inv_freq [D/2].
void step_in(const float* h, int64_t B, int64_t d, const float* norm_w, float eps, const looplm::QWeight& W,
             const float* f, int64_t half, const int64_t* pp, int64_t n_heads, int64_t n_kv_heads, float* out,
             bool rotate = true) {
  const int64_t D = 2 * half, R = n_heads + 2 * n_kv_heads;
  std::vector<float> u(static_cast<size_t>(B * d));
  looplm::rms_norm(h, norm_w, eps, B, d, u.data());
  looplm::qmatvecs(u.data(), B, d, {W}, {0}, out, R * D);
  if (rotate) looplm::rope_rows(out, B, R * D, n_heads + n_kv_heads, half, f, pp);
}

// h [B, d], norm_w [d], qkv_w: parts of [(H + 2 Hkv) D, d], inv_freq [D/2] (RoPE frequencies, as
// looplm.ops.attention.rope_cos_sin computes them), positions [B] long -> qkv [B, H + 2 Hkv, D]:
// q and k rotated by their row's position, v as projected (step_in).
Tensor attn_step_in(const Tensor& h, const Tensor& norm_w, double eps, at::TensorList qkv_w, const Tensor& inv_freq,
                    const Tensor& positions, int64_t n_heads, int64_t n_kv_heads) {
  TORCH_CHECK(h.dim() == 2 && inv_freq.dim() == 1, "attn_step: h [B, d], inv_freq [D/2]");
  const int64_t B = h.size(0), d = h.size(1), half = inv_freq.size(0), D = 2 * half;
  const int64_t R = n_heads + 2 * n_kv_heads;
  check(h, "h", {B, d});
  check(norm_w, "norm_w", {d});
  const looplm::QWeight W = looplm::qweight(qkv_w.vec(), R * D, d, "attn_step: qkv_w");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == B,
              "attn_step: positions must be a long tensor [B]");
  Tensor qkv = at::empty({B, R, D}, h.options());
  const Tensor pos = positions.contiguous();
  step_in(ptr(h), B, d, ptr(norm_w), static_cast<float>(eps), W, ptr(inv_freq), half, pos.data_ptr<int64_t>(),
          n_heads, n_kv_heads, qkv.data_ptr<float>());
  return qkv;
}

// One side (keys or values) of a cache [B, S, Hkv, D] with contiguous heads: float32 rows f, or
// int8 codes q with one scale per row (scale + b * scb + t * scs + head); sb, ss: the rows' row
// and slot strides (elements).
struct CacheRows {
  const float* f = nullptr;
  const int8_t* q = nullptr;
  const float* scale = nullptr;
  int64_t sb = 0, ss = 0, scb = 0, scs = 0;

  // Rows lo.. lo + n of row b, key head hk, as float with leading dimension *ld: the cache's own
  // memory for float rows, else the codes times their scales written into tmp [n, D].
  const float* at(int64_t b, int64_t hk, int64_t lo, int n, int64_t D, float* tmp, int* ld) const {
    if (f != nullptr) {
      *ld = static_cast<int>(ss);
      return f + b * sb + lo * ss + hk * D;
    }
    *ld = static_cast<int>(D);
    for (int t = 0; t < n; ++t) {
      const int8_t* c = q + b * sb + (lo + t) * ss + hk * D;
      const float s = scale[b * scb + (lo + t) * scs + hk];
      float* out = tmp + t * D;
      for (int64_t j = 0; j < D; ++j) out[j] = s * static_cast<float>(c[j]);
    }
    return tmp;
  }
};

// sum_j a[j] b[j] over D floats in vector lanes (two independent sums).
inline float dot_lanes(const float* a, const float* b, int64_t D) {
  using looplm::Vec;
  const int64_t V = Vec::size();
  Vec acc0(0.0f), acc1(0.0f);
  int64_t j = 0;
  for (; j + 2 * V <= D; j += 2 * V) {
    acc0 = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + j + V), Vec::loadu(b + j + V), acc1);
  }
  for (; j + V <= D; j += V) acc0 = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc0);
  float s = (acc0 + acc1).reduce_add();
  for (; j < D; ++j) s += a[j] * b[j];
  return s;
}

// out [D] = sum_u w[u] x[u] over n rows x (row stride ld): four independent sums per lane block, so
// the loop is bound by loads and fused multiply-adds rather than by one sum's latency.
inline void weighted_rows(const float* w, const float* x, int64_t ld, int64_t n, int64_t D, float* out) {
  using looplm::Vec;
  const int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + V <= D; j += V) {
    Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
    int64_t u = 0;
    for (; u + 4 <= n; u += 4) {
      a0 = at::vec::fmadd(Vec(w[u]), Vec::loadu(x + u * ld + j), a0);
      a1 = at::vec::fmadd(Vec(w[u + 1]), Vec::loadu(x + (u + 1) * ld + j), a1);
      a2 = at::vec::fmadd(Vec(w[u + 2]), Vec::loadu(x + (u + 2) * ld + j), a2);
      a3 = at::vec::fmadd(Vec(w[u + 3]), Vec::loadu(x + (u + 3) * ld + j), a3);
    }
    for (; u < n; ++u) a0 = at::vec::fmadd(Vec(w[u]), Vec::loadu(x + u * ld + j), a0);
    ((a0 + a1) + (a2 + a3)).store(out + j);
  }
  for (; j < D; ++j) {
    float acc = 0;
    for (int64_t u = 0; u < n; ++u) acc += w[u] * x[u * ld + j];
    out[j] = acc;
  }
}

// y[j] += w x[j] over D floats.
inline void axpy_lanes(float w, const float* x, float* y, int64_t D) {
  using looplm::Vec;
  const int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + V <= D; j += V) at::vec::fmadd(Vec(w), Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
  for (; j < D; ++j) y[j] += w * x[j];
}

#ifdef LOOPLM_ROWS_GEMM
// Lanes [j, j + 16) of a row of D floats: all 16, or the first D - j.
inline __mmask16 lanes(int64_t j, int64_t D) {
  return D - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (D - j)) - 1);
}
#endif

// s[t] = scale * q . k_t for n keys k (row stride ld) of D floats; four keys at a time with their
// 16-lane products reduced together (rows_gemm.h's sum4) where the build has AVX-512.
inline void key_scores(const float* q, const float* keys, int64_t ld, int n, int64_t D, float scale, float* s) {
  int t = 0;
#ifdef LOOPLM_ROWS_GEMM
  for (; t + 4 <= n; t += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < D; j += 16) {
      const __mmask16 m = lanes(j, D);
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + j);
      for (int i = 0; i < 4; ++i)
        acc[i] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, keys + (t + i) * ld + j), acc[i]);
    }
    _mm_storeu_ps(s + t, _mm_mul_ps(_mm_set1_ps(scale), looplm::sum4(acc[0], acc[1], acc[2], acc[3])));
  }
#endif
  for (; t < n; ++t) s[t] = scale * dot_lanes(q, keys + t * ld, D);
}

// A cache k, v [B, S, Hkv, D] (CacheRows) read by the decoding step's queries q [B, H, D] ->
// o [B, H, D] = softmax(q k^T / sqrt(D)) v. Row b's query sees its keys from slot first[b] on
// (first: nullptr for all; the slots before are unused: a batch of caches of different lengths
// padded at the front); query head i reads key/value head i / (H / Hkv).
//
// Split-K decoding attention (Dao et al., "Flash-Decoding", 2023): one parallel pass over chunks of
// 64 keys (row, chunk); per key head, the chunk's keys and values are read once for the `group`
// query heads sharing them, and its softmax is kept unnormalised: max m, sum l of exp(s - m) and
// acc = sum exp(s - m) v per query head. The chunks are then combined per query head in chunk
// order: o = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, M = max_c m_c. One parallel region per
// call (each costs a fork and a barrier) and vector dot products instead of BLAS calls (at 64 keys a
// call's packing costs more than the product). A chunk is attend_chunk.h's kernel where the build
// has AVX-512 or AVX2 and D suits it; the portable path below dequantises int8 rows a chunk at a time
// into a buffer of the thread's own.
void attend(const float* qp, const CacheRows& kr, const CacheRows& vr, int64_t B, int64_t H, int64_t Hkv, int64_t D,
            int64_t S, const int64_t* first, float* op) {
  using looplm::Vec;
  const int64_t group = H / Hkv, V = Vec::size();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  constexpr int64_t kKeys = looplm::kChunkKeys;  // keys per chunk
  const int64_t chunks = (S + kKeys - 1) / kKeys, items = B * Hkv * chunks;
  // per (row, key head, chunk) and query head of the group: m, l, then acc [D]
  const int64_t per = 2 + D;
  std::vector<float> part(static_cast<size_t>(items * group * per));
  const bool quantised = kr.f == nullptr || vr.f == nullptr;
#ifdef LOOPLM_ATTEND_CHUNK
  const bool chunked = looplm::chunk_head_dim(D);  // attend_chunk.h's kernels
#else
  const bool chunked = false;
#endif
  // item bc = (row b, chunk c) reads slots [lo, hi) of row b (none when lo >= hi)
  const auto span = [&](int64_t bc, int64_t* lo, int64_t* hi) {
    const int64_t b = bc / chunks, c = bc % chunks;
    *lo = std::max(c * kKeys, first == nullptr ? int64_t{0} : first[b]);
    *hi = std::min(S, (c + 1) * kKeys);
  };
  // Work items are (row, chunk): a chunk's slots hold every key head's row side by side, so one
  // thread reads them in address order (an item per key head would stride over the others' rows).
  // Each thread takes one run of consecutive items holding an equal share of the keys: the rows of
  // a batch hold different numbers of keys, and runs of equal item counts would leave one thread
  // the longer rows.
  const int64_t n_items = B * chunks;
  std::vector<int64_t> upto(static_cast<size_t>(n_items + 1), 0);  // keys (+ a fixed cost) before item i
  for (int64_t i = 0; i < n_items; ++i) {
    int64_t lo = 0, hi = 0;
    span(i, &lo, &hi);
    upto[i + 1] = upto[i] + std::max<int64_t>(hi - lo, 0) + 8;
  }
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));
  const auto run_start = [&](int64_t r) {  // the first item of run r
    return static_cast<int64_t>(std::lower_bound(upto.begin(), upto.end(), upto.back() * r / runs) - upto.begin());
  };
  at::parallel_for(0, runs, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> ktmp(quantised && !chunked ? static_cast<size_t>(kKeys * D) : 0), vtmp(ktmp.size());
    std::vector<float> sc(static_cast<size_t>(std::max<int64_t>(group, 4) * kKeys));
    for (int64_t bc = run_start(r0), last = run_start(r1); bc < last; ++bc) {
      const int64_t b = bc / chunks, c = bc % chunks;
      int64_t lo = 0, hi = 0;
      span(bc, &lo, &hi);
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        float* pt = part.data() + ((b * Hkv + hk) * chunks + c) * group * per;
        if (lo >= hi) {  // nothing seen in this chunk: weight 0
          for (int64_t g = 0; g < group; ++g) pt[g * per] = -std::numeric_limits<float>::infinity(), pt[g * per + 1] = 0;
          continue;
        }
        const int n = static_cast<int>(hi - lo);
        const float* q = qp + (b * H + hk * group) * D;
#ifdef LOOPLM_ATTEND_CHUNK
        if (chunked) {
          if (!quantised) {
            const looplm::FloatRows keys{kr.f + b * kr.sb + lo * kr.ss + hk * D, kr.ss},
                values{vr.f + b * vr.sb + lo * vr.ss + hk * D, vr.ss};
            looplm::chunk_attend_group(q, group, D, keys, values, n, nullptr, nullptr, scale, sc.data(), pt, per);
            continue;
          }
          float ks[kKeys], vs[kKeys];
          for (int t = 0; t < n; ++t) {
            ks[t] = kr.scale[b * kr.scb + (lo + t) * kr.scs + hk];
            vs[t] = vr.scale[b * vr.scb + (lo + t) * vr.scs + hk];
          }
          const looplm::Int8Rows keys{kr.q + b * kr.sb + lo * kr.ss + hk * D, kr.ss},
              values{vr.q + b * vr.sb + lo * vr.ss + hk * D, vr.ss};
          looplm::chunk_attend_group(q, group, D, keys, values, n, ks, vs, scale, sc.data(), pt, per);
          continue;
        }
#endif
        int kld = 0, vld = 0;
        const float* keys = kr.at(b, hk, lo, n, D, ktmp.data(), &kld);
        const float* values = vr.at(b, hk, lo, n, D, vtmp.data(), &vld);
        for (int64_t g = 0; g < group; ++g) {
          float* s = sc.data() + g * kKeys;
          key_scores(q + g * D, keys, kld, n, D, scale, s);
          const float top = *std::max_element(s, s + n);
          int64_t t = 0;
          for (; t + V <= n; t += V) (Vec::loadu(s + t) - Vec(top)).exp().store(s + t);
          for (; t < n; ++t) s[t] = std::exp(s[t] - top);
          float total = 0;
          for (t = 0; t < n; ++t) total += s[t];
          weighted_rows(s, values, vld, n, D, pt + g * per + 2);
          pt[g * per] = top, pt[g * per + 1] = total;
        }
      }
    }
  });
  for (int64_t bk = 0; bk < B * Hkv; ++bk) {
    for (int64_t g = 0; g < group; ++g) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, part[((bk * chunks + c) * group + g) * per]);
      float* o = op + (bk * group + g) * D;  // query head (b, hk * group + g)
      std::fill(o, o + D, 0.0f);
      float total = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* pt = part.data() + ((bk * chunks + c) * group + g) * per;
        if (pt[1] == 0) continue;
        const float w = std::exp(pt[0] - top);
        total += w * pt[1];
        axpy_lanes(w, pt + 2, o, D);
      }
      const float inv = 1.0f / total;
      for (int64_t j = 0; j < D; ++j) o[j] *= inv;
    }
  }
}

// out [B, d] = h + o W_o^T (o: the attention output [B, H D]), then + the dense SwiGLU FFN of it
// when ffn_in has rows (ffn_norm_w [d], ffn_in [2F, d], ffn_out [d, F]).
void step_out(const float* h, const float* o, const looplm::QWeight& O, const at::Tensor* ffn_norm_w, double ffn_eps,
              const looplm::QWeight& ffn_in, const looplm::QWeight& ffn_out, at::Tensor& out) {
  const int64_t B = out.size(0), d = out.size(1);
  float* hp = out.data_ptr<float>();
  looplm::qmatvecs(o, B, O.k, {O}, {0}, hp, d);
  for (int64_t i = 0; i < B * d; ++i) hp[i] += h[i];
  if (ffn_norm_w != nullptr) looplm::add_swiglu_ffn(out, *ffn_norm_w, ffn_eps, ffn_in, ffn_out);
}

void check_cache(const Tensor& t, int64_t D) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.stride(3) == 1 && t.stride(2) == D &&
                  t.device().is_cpu(),
              "attn_step: k, v must be float32 CPU tensors [B, S, Hkv, D] with contiguous heads");
}

// x [D] -> int8 codes [D] and their scale, as looplm/ops/kv_quant.py's quantize_rows: s =
// max(max |x| / 127, FLT_MIN), code = x / s rounded half to even, a vector at a time (a decoding
// step of B rows quantises 2 B Hkv of these per layer, its rows over threads).
void quantize_row(const float* x, int64_t D, int8_t* code, float* scale) {
  using looplm::Vec;
  const int64_t V = Vec::size();
  Vec top(0.0f);
  for (int64_t j = 0; j < D; j += V) top = at::vec::maximum(top, Vec::loadu(x + j, std::min(V, D - j)).abs());
  alignas(64) float lanes[Vec::size()];
  top.store(lanes);
  const float t = *std::max_element(lanes, lanes + V);
  const float s = std::max(t / 127.0f, std::numeric_limits<float>::min());
  for (int64_t j = 0; j < D; j += V) {
    const int m = static_cast<int>(std::min(V, D - j));
    at::vec::clamp((Vec::loadu(x + j, m) / Vec(s)).round(), Vec(-127.0f), Vec(127.0f)).store(lanes, m);
    for (int u = 0; u < m; ++u) code[j + u] = static_cast<int8_t>(lanes[u]);
  }
  *scale = s;
}

// t: a cache side [B, S, Hkv, D] with contiguous heads, float32 (scale None) or int8 codes with
// scale float32 [B, S, Hkv, 1] (one per cached row, heads adjacent) -> its CacheRows.
CacheRows cache_rows(const Tensor& t, const std::optional<Tensor>& scale, int64_t D, const char* name) {
  CacheRows r;
  r.sb = t.stride(0), r.ss = t.stride(1);
  if (!scale.has_value()) {
    check_cache(t, D);
    r.f = t.data_ptr<float>();
    return r;
  }
  const Tensor& s = *scale;
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kChar && t.stride(3) == 1 && t.stride(2) == D &&
                  t.device().is_cpu(),
              "attn_step: ", name, " with a scale must be int8 codes [B, S, Hkv, D] with contiguous heads");
  TORCH_CHECK(s.dim() == 4 && s.scalar_type() == at::kFloat && s.device().is_cpu() && s.size(0) == t.size(0) &&
                  s.size(1) == t.size(1) && s.size(2) == t.size(2) && s.size(3) == 1 && s.stride(2) == 1,
              "attn_step: ", name, "'s scale must be float32 [B, S, Hkv, 1] with adjacent heads");
  r.q = t.data_ptr<int8_t>();
  r.scale = s.data_ptr<float>();
  r.scb = s.stride(0), r.scs = s.stride(1);
  return r;
}

// h [B, d] (the layer's input), q [B, H, D], k, v [B, S, Hkv, D] (the cache after the append,
// last dim contiguous: views of its buffer), o_w: parts of [d, H D]; ffn_norm_w [d], ffn_in_w:
// parts of [2F, d], ffn_out_w: of [d, F] (all or none: None and empty lists); starts [B] long or
// None (zeros): each row's first seen slot; k_scale, v_scale [B, S, Hkv, 1] float32 (both or
// none): k, v are int8 codes of rows times these scales; mix [B, H, D] or None: an output to
// average with the attention's, o = (attend(q, k, v) + mix) / 2 (Liger Attention's sliding window
// beside its recurrence) -> h + o_proj(o) (+ the FFN). The caller checks that no seen slot is
// masked or holds a later position.
Tensor attn_step_out(const Tensor& h, const Tensor& q, const Tensor& k, const Tensor& v, at::TensorList o_w,
                     const std::optional<Tensor>& ffn_norm_w, at::TensorList ffn_in_w, at::TensorList ffn_out_w,
                     double ffn_eps, const std::optional<Tensor>& starts, const std::optional<Tensor>& k_scale,
                     const std::optional<Tensor>& v_scale, const std::optional<Tensor>& mix) {
  TORCH_CHECK(h.dim() == 2 && q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(),
              "attn_step: h [B, d], q [B, H, D], k, v [B, S, Hkv, D]");
  const int64_t B = h.size(0), d = h.size(1), H = q.size(1), D = q.size(2), S = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && S > 0 && H % Hkv == 0, "attn_step: k, v must be [B, S, Hkv, D]");
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), "attn_step: k_scale and v_scale together");
  const CacheRows kr = cache_rows(k, k_scale, D, "k"), vr = cache_rows(v, v_scale, D, "v");
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
  looplm::QWeight fin, fout;
  if (ffn) {
    check(*ffn_norm_w, "ffn_norm_w", {d});
    TORCH_CHECK(ffn_out_w[0].dim() == 2, "attn_step: ffn_out_w must start with a matrix");
    const int64_t F = ffn_out_w.size() == 3 ? 2 * ffn_out_w[0].size(1) : ffn_out_w[0].size(1);
    fin = looplm::qweight(ffn_in_w.vec(), 2 * F, d, "attn_step: ffn_in_w");
    fout = looplm::qweight(ffn_out_w.vec(), d, F, "attn_step: ffn_out_w");
  }
  std::vector<float> o(static_cast<size_t>(B * H * D));
  attend(ptr(q), kr, vr, B, H, Hkv, D, S, first.data(), o.data());
  if (mix.has_value()) {
    check(*mix, "mix", {B, H, D});
    const float* m = ptr(*mix);
    for (int64_t i = 0; i < B * H * D; ++i) o[i] = 0.5f * (m[i] + o[i]);
  }
  Tensor out = at::empty({B, d}, h.options());
  step_out(ptr(h), o.data(), O, ffn ? &*ffn_norm_w : nullptr, ffn_eps, fin, fout, out);
  return out;
}

// starts[l] (None: every row from slot 0) as each row's first seen slot, checked to lie in [0, S).
std::vector<int64_t> first_slots(const c10::List<std::optional<Tensor>>& starts, int64_t l, int64_t B, int64_t S) {
  if (starts.empty()) return {};
  const std::optional<Tensor> st = starts.get(l);
  if (!st.has_value()) return {};
  TORCH_CHECK(st->scalar_type() == at::kLong && st->dim() == 1 && st->size(0) == B,
              "attn_stack_step: layer ", l, "'s starts must be a long tensor [B]");
  const Tensor c = st->contiguous();
  std::vector<int64_t> first(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + B);
  for (const int64_t f : first) TORCH_CHECK(f >= 0 && f < S, "attn_stack_step: starts must be in [0, S)");
  return first;
}

// A decoding step (T = 1) of L attention layers in a row, each with its cache appended in place:
// h [B, d]; w: kSlots entries per layer (mixer norm; the parts of qkv, o, FFN in, FFN out, each
// padded with None to 3; FFN norm and parts None for a layer without an FFN); eps [2 L] (mixer,
// FFN norms); caches: per layer its buffers k, v [B, C, Hkv, D], key_mask [B, C] bool, pos [B, C]
// long, of which the first lengths[l] slots are in use: slot lengths[l] gets the new key, value,
// True and the position, then the layer attends over lengths[l] + 1 slots (the caller checks they
// are all unmasked and not later). An int8 cache (k, v int8 codes; every layer's alike) has two
// more buffers per layer, k_scale, v_scale [B, C, Hkv, 1] float32: the new key and value are
// quantised per head as looplm/ops/kv_quant.py's quantize_rows does. starts: empty, or per layer
// None or [B] long: each row's first seen slot in that layer (slots before it are unused: caches of
// different lengths in one batch, padded at the front). ssm: empty, or per layer None (attention)
// or [B, H, D, D or D + 1] float32 (D + 1: normalised, liger.h): the layer is linearised attention (Liger GLA, looplm/layers/liger.py)
// with that recurrent state and a sliding window of windows[l] > 0 positions (its cache holds the
// window's keys, positions increasing along each row's slots): the recurrence (liger.h) reads q, k
// before RoPE, the window's attention each row's keys of the last windows[l] positions, and the two
// outputs are averaged, the new state written into ssm_out (one buffer per linearised layer, in
// order); tau: the gate's temperature. -> h after the L layers.
Tensor attn_stack_step(const Tensor& h, const c10::List<std::optional<Tensor>>& w, at::ArrayRef<double> eps,
                       const Tensor& inv_freq, const Tensor& positions, int64_t n_heads, int64_t n_kv_heads,
                       at::TensorList caches, at::IntArrayRef lengths, const c10::List<std::optional<Tensor>>& starts,
                       const c10::List<std::optional<Tensor>>& ssm, at::TensorList ssm_out, at::IntArrayRef windows,
                       double tau) {
  const int64_t L = static_cast<int64_t>(lengths.size());
  TORCH_CHECK(starts.empty() || static_cast<int64_t>(starts.size()) == L,
              "attn_stack_step: starts must be empty or one entry per layer");
  TORCH_CHECK(ssm.empty() || (static_cast<int64_t>(ssm.size()) == L && static_cast<int64_t>(windows.size()) == L),
              "attn_stack_step: ssm and windows must be empty or one entry per layer");
  TORCH_CHECK(h.dim() == 2 && inv_freq.dim() == 1, "attn_stack_step: h [B, d], inv_freq [D/2]");
  const bool int8 = !caches.empty() && caches[0].scalar_type() == at::kChar;
  const int64_t per = int8 ? 6 : 4;  // cache buffers per layer
  TORCH_CHECK(static_cast<int64_t>(w.size()) == looplm::kSlots * L && static_cast<int64_t>(eps.size()) == 2 * L &&
                  static_cast<int64_t>(caches.size()) == per * L,
              "attn_stack_step: ", looplm::kSlots, " weights, 2 eps and 4 cache buffers (6 for int8) per layer");
  const int64_t B = h.size(0), d = h.size(1), half = inv_freq.size(0), D = 2 * half, H = n_heads, Hkv = n_kv_heads;
  const int64_t R = H + 2 * Hkv;
  TORCH_CHECK(H % Hkv == 0, "attn_stack_step: n_heads must be a multiple of n_kv_heads");
  check(h, "h", {B, d});
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == B,
              "attn_stack_step: positions must be a long tensor [B]");
  const Tensor pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  Tensor x = h.clone(), y = at::empty_like(h);
  std::vector<float> qkv(static_cast<size_t>(B * R * D)), o(static_cast<size_t>(B * H * D)), rec;
  size_t linearised = 0;  // linearised layers so far: the next one's ssm_out buffer
  for (int64_t l = 0; l < L; ++l) {
    const int64_t base = looplm::kSlots * l, S = lengths[l];
    const Tensor &k = caches[per * l], &v = caches[per * l + 1], &km = caches[per * l + 2], &kp = caches[per * l + 3];
    std::optional<Tensor> k_scale, v_scale;
    if (int8) {
      k_scale = caches[per * l + 4], v_scale = caches[per * l + 5];
      TORCH_CHECK(k_scale->is_contiguous() && v_scale->is_contiguous(),
                  "attn_stack_step: layer ", l, "'s scale buffers must be contiguous [B, C, Hkv, 1]");
    }
    const CacheRows kr = cache_rows(k, k_scale, D, "k"), vr = cache_rows(v, v_scale, D, "v");
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() && k.size(0) == B &&
                    k.size(2) == Hkv && S >= 0 && S < k.size(1),
                "attn_stack_step: layer ", l, "'s k, v buffers must be contiguous [B, C, Hkv, D] with C > length");
    TORCH_CHECK(km.scalar_type() == at::kBool && kp.scalar_type() == at::kLong && km.is_contiguous() &&
                    kp.is_contiguous() && km.sizes() == kp.sizes() && km.size(0) == B && km.size(1) == k.size(1),
                "attn_stack_step: layer ", l, "'s key_mask (bool) and pos (long) buffers must be [B, C]");
    const std::optional<Tensor> norm_w = w.get(base), ffn_norm_w = w.get(base + 7);
    TORCH_CHECK(norm_w.has_value(), "attn_stack_step: layer ", l, " has no mixer norm");
    check(*norm_w, "norm_w", {d});
    const looplm::QWeight Wqkv = looplm::qweight(looplm::parts_at(w, base + 1), R * D, d, "attn_stack_step: qkv");
    const looplm::QWeight O = looplm::qweight(looplm::parts_at(w, base + 4), d, H * D, "attn_stack_step: o");
    looplm::QWeight fin, fout;
    if (ffn_norm_w.has_value()) {
      check(*ffn_norm_w, "ffn_norm_w", {d});
      const std::vector<Tensor> out_parts = looplm::parts_at(w, base + 11);
      TORCH_CHECK(!out_parts.empty() && out_parts[0].dim() == 2, "attn_stack_step: FFN out weight missing");
      const int64_t F = out_parts.size() == 3 ? 2 * out_parts[0].size(1) : out_parts[0].size(1);
      fin = looplm::qweight(looplm::parts_at(w, base + 8), 2 * F, d, "attn_stack_step: ffn_in");
      fout = looplm::qweight(out_parts, d, F, "attn_stack_step: ffn_out");
    }
    const std::optional<Tensor> s_in = ssm.empty() ? std::nullopt : ssm.get(l);
    const bool liger = s_in.has_value();
    step_in(ptr(x), B, d, ptr(*norm_w), static_cast<float>(eps[2 * l]), Wqkv, ptr(inv_freq), half, pp, H, Hkv,
            qkv.data(), !liger);
    if (liger) {  // the recurrence reads q and k before RoPE
      TORCH_CHECK(!int8 && windows[l] > 0, "attn_stack_step: a linearised layer needs float32 caches and a window");
      const int64_t Dv = s_in->dim() == 4 && s_in->size(3) == D + 1 ? D + 1 : D;
      check(*s_in, "ssm", {B, H, D, Dv});
      TORCH_CHECK(linearised < ssm_out.size(), "attn_stack_step: one ssm_out buffer per linearised layer");
      const Tensor& s_out = ssm_out[linearised++];
      check(s_out, "ssm_out", {B, H, D, Dv});
      rec.resize(static_cast<size_t>(B * H * D));
      looplm::liger_gla_heads(qkv.data(), ptr(*s_in), B, H, Hkv, D, Dv, static_cast<float>(tau), rec.data(),
                              s_out.data_ptr<float>());
      looplm::rope_rows(qkv.data(), B, R * D, H + Hkv, half, ptr(inv_freq), pp);
    }
    int64_t* pb = kp.data_ptr<int64_t>();
    bool* mb = km.data_ptr<bool>();
    const int64_t C = k.size(1), row = C * Hkv * D;
    // the append: slot S of every row (an int8 cache's rows quantised), rows over threads
    at::parallel_for(0, B, int8 ? 4 : 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float* src = qkv.data() + b * R * D;
        const int64_t at = b * row + S * Hkv * D;
        if (int8) {
          for (int64_t j = 0; j < Hkv; ++j) {
            const int64_t scale_at = (b * C + S) * Hkv + j;
            quantize_row(src + (H + j) * D, D, k.data_ptr<int8_t>() + at + j * D,
                         k_scale->data_ptr<float>() + scale_at);
            quantize_row(src + (H + Hkv + j) * D, D, v.data_ptr<int8_t>() + at + j * D,
                         v_scale->data_ptr<float>() + scale_at);
          }
        } else {
          std::copy(src + H * D, src + (H + Hkv) * D, k.data_ptr<float>() + at);
          std::copy(src + (H + Hkv) * D, src + R * D, v.data_ptr<float>() + at);
        }
        mb[b * C + S] = true;
        pb[b * C + S] = pp[b];
      }
    });
    std::vector<float> q(static_cast<size_t>(B * H * D));
    for (int64_t b = 0; b < B; ++b) std::copy(qkv.data() + b * R * D, qkv.data() + b * R * D + H * D, q.data() + b * H * D);
    std::vector<int64_t> first = first_slots(starts, l, B, S + 1);
    if (liger) {  // each row from its first key inside the window: positions > p - W
      if (first.empty()) first.assign(static_cast<size_t>(B), 0);
      for (int64_t b = 0; b < B; ++b) {
        int64_t t = S;
        while (t > first[b] && pb[b * C + t - 1] > pp[b] - windows[l]) --t;
        first[b] = t;
      }
    }
    attend(q.data(), kr, vr, B, H, Hkv, D, S + 1, first.empty() ? nullptr : first.data(), o.data());
    if (liger)
      for (int64_t i = 0; i < B * H * D; ++i) o[i] = 0.5f * (rec[i] + o[i]);
    step_out(ptr(x), o.data(), O, ffn_norm_w.has_value() ? &*ffn_norm_w : nullptr, eps[2 * l + 1], fin, fout, y);
    std::swap(x, y);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
  m.def(
      "attn_step_in(Tensor h, Tensor norm_w, float eps, Tensor[] qkv_w, Tensor inv_freq, Tensor positions, "
      "int n_heads, int n_kv_heads) -> Tensor");
  m.def(
      "attn_step_out(Tensor h, Tensor q, Tensor k, Tensor v, Tensor[] o_w, Tensor? ffn_norm_w, Tensor[] ffn_in_w, "
      "Tensor[] ffn_out_w, float ffn_eps, Tensor? starts=None, Tensor? k_scale=None, Tensor? v_scale=None, "
      "Tensor? mix=None) -> Tensor");
  m.def(
      "attn_stack_step(Tensor h, Tensor?[] w, float[] eps, Tensor inv_freq, Tensor positions, int n_heads, "
      "int n_kv_heads, Tensor(a!)[] caches, int[] lengths, Tensor?[] starts, Tensor?[] ssm, Tensor(b!)[] ssm_out, "
      "int[] windows, float tau) -> Tensor");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) {
  m.impl("attn_step_in", attn_step_in);
  m.impl("attn_step_out", attn_step_out);
  m.impl("attn_stack_step", attn_stack_step);
}
