// y = x W^T (+ b) for a few rows of x: the matrix-vector products of decoding (from 4 rows on,
// rows_gemm.h's blocked product where it is built). See looplm/ops/linear.py for why this exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "rows_gemm.h"
#include "vec.h"

namespace {

using looplm::dot;

// x [M, K], w [N, K], b [N] or None, all float32 and contiguous -> [M, N]; rows of w over threads.
at::Tensor linear_small(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_small: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.is_contiguous() &&
                  w.is_contiguous(), "linear_small: contiguous float32 x and w");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* bp = nullptr;
  at::Tensor bc;
  if (b.has_value()) {
    bc = b->to(at::kFloat).contiguous();
    bp = bc.data_ptr<float>();
  }
  float* yp = y.data_ptr<float>();
#ifdef LOOPLM_ROWS_GEMM
  if (m >= 4) {
    looplm::rows_gemm(xp, m, k, {{wp, n, 0}}, yp, n);
    if (bp != nullptr)
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < n; ++j) yp[r * n + j] += bp[j];
    return y;
  }
#endif
  at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; ++j) {
      for (int64_t r = 0; r < m; ++r) {
        yp[r * n + j] = dot(xp + r * k, wp + j * k, k) + (bp ? bp[j] : 0.0f);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) { m.def("linear_small(Tensor x, Tensor w, Tensor? b) -> Tensor"); }

TORCH_LIBRARY_IMPL(looplm, CPU, m) { m.impl("linear_small", linear_small); }
