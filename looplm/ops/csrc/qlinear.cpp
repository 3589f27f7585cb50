// y = x W^T for a few rows of x with float32, int8 or int4 weights (qmatvec.h), the SwiGLU of
// such a product for many rows, and the rows of a quantised embedding table. See
// looplm/ops/qlinear.py for why this exists and its reference.
#include "simd.h"  // first: it selects ATen's vector instruction set

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "qmatvec.h"

namespace {

using at::Tensor;

// x [M, K] float32, w: weight parts of [N, K] -> [M, N].
Tensor qlinear(const Tensor& x, at::TensorList w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "qlinear: x must be a contiguous float32 CPU tensor [M, K]");
  TORCH_CHECK(!w.empty() && w[0].dim() == 2, "qlinear: weight parts must start with a matrix");
  const int64_t m = x.size(0), k = x.size(1), n = w[0].size(0);
  const looplm::QWeight W = looplm::qweight(w.vec(), n, k, "qlinear");
  Tensor y = at::empty({m, n}, x.options());
  looplm::qmatvecs(x.data_ptr<float>(), m, k, {W}, {0}, y.data_ptr<float>(), n);
  return y;
}

// x [M, K] float32 times w [N, K] float32 -> [M, N], both rounded to bfloat16, float32 sums, on
// AMX tiles (qmatmul_bf16); K % 32 == 0, CPUs where bf16_rows() > 0.
Tensor linear_bf16(const Tensor& x, const Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "linear_bf16: x must be a contiguous float32 CPU tensor [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "linear_bf16: w must be [N, K]");
  TORCH_CHECK(x.size(1) % 32 == 0, "linear_bf16: K must be a multiple of 32");
  TORCH_CHECK(looplm::bf16_rows() > 0, "linear_bf16: no AMX bfloat16 tiles on this CPU or build");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const looplm::QWeight W = looplm::qweight({w}, n, k, "linear_bf16");
  Tensor y = at::empty({m, n}, x.options());
#ifdef LOOPLM_AMX
  looplm::qmatmul_bf16(x.data_ptr<float>(), m, k, {W}, {0}, y.data_ptr<float>(), n, /*all=*/true);
#endif
  return y;
}

#ifdef LOOPLM_AMX
// out[r, j] = silu(x[r] . W[j]) * (x[r] . W[F + j]) for j < F: W [2F, k] holds the gate rows, then
// the up rows (SwiGLU, Shazeer 2020, as looplm/layers/ffn.py fuses them). The products are
// qmatmul_bf16's (every weight kind in bfloat16, float32 sums; the same floats), but each thread
// takes strips of 32 gate rows with their 32 up rows, keeps both products of its strip in a scratch
// of its own and writes only out: the [rows, 2F] product is never stored and read back.
void qmatmul_bf16_swiglu(const float* x, int64_t rows, int64_t k, const looplm::QWeight& W, float* out) {
  using looplm::kAmxStrip;
  const int64_t F = W.n / 2;
  const uint16_t* xp = looplm::amx_packed(x, rows, k);
  at::parallel_for(0, (F + kAmxStrip - 1) / kAmxStrip, 1, [&](int64_t s0, int64_t s1) {
    thread_local std::vector<float> products;  // the strip's gate products [rows, 32], then its up ones
    products.resize(static_cast<size_t>(2 * rows * kAmxStrip));
    float *gate = products.data(), *up = gate + rows * kAmxStrip;
    looplm::amx_configure();
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t j = s * kAmxStrip, n = std::min(kAmxStrip, F - j);
      for (const int64_t half : {int64_t{0}, F})
        looplm::amx_weight_rows(W, half + j, n, xp, rows, half ? up : gate, kAmxStrip, 0);
      for (int64_t r = 0; r < rows; ++r)
        looplm::silu_mul(gate + r * kAmxStrip, up + r * kAmxStrip, 1.0f, n, out + r * F + j);
    }
    _tile_release();
  });
}
#endif

// x [M, K] float32, w: weight parts of [2F, K] (gate rows, then up rows) -> silu(x Wg^T) * (x Wu^T)
// [M, F], on AMX tiles: M >= bf16_rows() (> 0).
Tensor qlinear_swiglu(const Tensor& x, at::TensorList w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "qlinear_swiglu: x must be a contiguous float32 CPU tensor [M, K]");
  TORCH_CHECK(!w.empty() && w[0].dim() == 2 && w[0].size(0) % 2 == 0,
              "qlinear_swiglu: weight parts must start with a matrix of an even number of rows");
  TORCH_CHECK(x.size(1) % 32 == 0, "qlinear_swiglu: K must be a multiple of 32");
  TORCH_CHECK(looplm::bf16_rows() > 0 && x.size(0) >= looplm::bf16_rows(),
              "qlinear_swiglu: needs AMX bfloat16 tiles and at least bf16_rows() rows of x");
  const int64_t m = x.size(0), k = x.size(1), n = w[0].size(0);
  const looplm::QWeight W = looplm::qweight(w.vec(), n, k, "qlinear_swiglu");
  Tensor y = at::empty({m, n / 2}, x.options());
#ifdef LOOPLM_AMX
  qmatmul_bf16_swiglu(x.data_ptr<float>(), m, k, W, y.data_ptr<float>());
#endif
  return y;
}

// ids [M] long, w: parts of a table [V, D] (int8 or int4) -> its rows [M, D] in float32.
Tensor qembedding(const Tensor& ids, at::TensorList w) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "qembedding: ids must be a long tensor [M]");
  TORCH_CHECK(w.size() >= 2 && w[0].dim() == 2, "qembedding: parts [q, scale] or [packed, scale, offset]");
  const int64_t m = ids.size(0), v = w[0].size(0);
  const int64_t dim = w.size() == 2 ? w[0].size(1) : 2 * w[0].size(1);
  const looplm::QWeight W = looplm::qweight(w.vec(), v, dim, "qembedding");
  const Tensor idc = ids.contiguous();
  const int64_t* ip = idc.data_ptr<int64_t>();
  Tensor out = at::empty({m, dim}, w[1].options());
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = ip[r];
    TORCH_CHECK(i >= 0 && i < v, "qembedding: id ", i, " is out of range for ", v, " rows");
    float* o = op + r * dim;
    if (W.kind == looplm::QWeight::I8) {
      const int8_t* q = W.q + i * dim;
      const float* s = W.scale + i * (dim / W.group);
      for (int64_t c = 0; c < dim; ++c) o[c] = static_cast<float>(q[c]) * s[c / W.group];
    } else {
      const int64_t groups = dim / W.group;
      const uint8_t* p = W.packed + i * (dim / 2);
      const float *s = W.scale + i * groups, *f = W.offset + i * groups;
      for (int64_t c = 0; c < dim; ++c) {
        const int code = c % 2 ? p[c / 2] >> 4 : p[c / 2] & 15;
        volatile float scaled = static_cast<float>(code) * s[c / W.group];  // rounded as PyTorch's
        o[c] = f[c / W.group] + scaled;  // dequantise (no fused multiply-add): the same floats
      }
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
  m.def("qlinear(Tensor x, Tensor[] w) -> Tensor");
  m.def("qembedding(Tensor ids, Tensor[] w) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("qlinear_swiglu(Tensor x, Tensor[] w) -> Tensor");
  m.def("qlinear_bf16_rows() -> int", [] { return looplm::bf16_rows(); });
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) {
  m.impl("qlinear", qlinear);
  m.impl("qembedding", qembedding);
  m.impl("linear_bf16", linear_bf16);
  m.impl("qlinear_swiglu", qlinear_swiglu);
}
