// One decoding step (T = 1) of Liger GLA's recurrence (looplm/layers/liger.py, Lan et al. 2025) for
// B rows in one call: the ~30 small PyTorch ops of the Python step (group repeat, two softmax
// feature maps, the key's log-sigmoid gate, decay, outer product, read-out) per layer cost more
// than their arithmetic at 30 layers. The Python layer is the reference; the tests compare them.
#include "simd.h"  // first: it selects ATen's vector instruction set

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "liger.h"

namespace {

using at::Tensor;

// qkv [B, H + 2 Hkv, D]: q, k, v as projected (before RoPE); ssm [B, H, D, Dv] (Dv = D, or D + 1:
// the normalised read-out, liger.h); inv_freq [D/2] and
// positions [B] long (RoPE) -> (o [B, H, D], ssm', qk [B, H + Hkv, D]: q and k rotated by their
// row's position, for the window's attention); looplm::liger_gla_heads is the recurrence.
std::vector<Tensor> liger_gla_step(const Tensor& qkv, const Tensor& ssm, int64_t n_heads, int64_t n_kv_heads,
                                   double tau, const Tensor& inv_freq, const Tensor& positions) {
  TORCH_CHECK(qkv.dim() == 3 && ssm.dim() == 4 && n_kv_heads > 0 && n_heads % n_kv_heads == 0,
              "liger_gla_step: qkv [B, H + 2 Hkv, D], ssm [B, H, D, D or D + 1], H a multiple of Hkv");
  const int64_t B = qkv.size(0), H = n_heads, Hkv = n_kv_heads, D = qkv.size(2), Dv = ssm.size(3);
  TORCH_CHECK(qkv.size(1) == H + 2 * Hkv && ssm.size(0) == B && ssm.size(1) == H && ssm.size(2) == D &&
                  (Dv == D || Dv == D + 1),
              "liger_gla_step: qkv [B, H + 2 Hkv, D] and ssm [B, H, D, D or D + 1] disagree");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && ssm.scalar_type() == at::kFloat && qkv.device().is_cpu() &&
                  ssm.device().is_cpu(),
              "liger_gla_step: float32 CPU tensors");
  TORCH_CHECK(inv_freq.dim() == 1 && 2 * inv_freq.size(0) == D && inv_freq.scalar_type() == at::kFloat &&
                  positions.dim() == 1 && positions.size(0) == B && positions.scalar_type() == at::kLong,
              "liger_gla_step: inv_freq float32 [D/2], positions long [B]");
  const Tensor x = qkv.contiguous(), s0 = ssm.contiguous(), f = inv_freq.contiguous(), pos = positions.contiguous();
  Tensor o = at::empty({B, H, D}, qkv.options()), s1 = at::empty_like(s0);
  looplm::liger_gla_heads(x.data_ptr<float>(), s0.data_ptr<float>(), B, H, Hkv, D, Dv, static_cast<float>(tau),
                          o.data_ptr<float>(), s1.data_ptr<float>());
  Tensor qk = x.slice(1, 0, H + Hkv).contiguous();
  looplm::rope_rows(qk.data_ptr<float>(), B, (H + Hkv) * D, H + Hkv, D / 2, f.data_ptr<float>(),
                    pos.data_ptr<int64_t>());
  return {o, s1, qk};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(looplm, m) {
  m.def("liger_gla_step(Tensor qkv, Tensor ssm, int n_heads, int n_kv_heads, float tau, Tensor inv_freq, "
        "Tensor positions) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) { m.impl("liger_gla_step", liger_gla_step); }
