// The delta rule's chunk form (forward and backward), each thread on its own range of groups.
// The math and the names follow looplm/ops/delta_chunkwise.py (its PyTorch form is the reference
// and the tests compare the two); the loop over chunks runs one group at a time on BLAS, and the
// backward loop also forms the outputs' part of dS. looplm/ops/delta_kernel.py says why this
// exists. Layout: group-major rows [G*N, C, d] (group g owns rows g*N .. g*N+N-1), states
// [G, N, dk, dv] (S_0 .. S_{N-1}; S_N is the final state).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <limits>
#include <vector>

// Fortran BLAS, exported by libtorch_cpu (MKL): the loop over chunks calls it directly, since the
// per-call overhead of an ATen matmul on one [32, 64] x [64, 64] product is about its cost.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace {

using at::Tensor;

Tensor rowdot(const Tensor& a, const Tensor& b) { return (a * b).sum(-1); }

Tensor mT(const Tensor& x) { return x.transpose(-1, -2); }

// at::*_out take the output by non-const reference; these take views (temporaries) of it.
void bmm_into(Tensor out, const Tensor& a, const Tensor& b) { at::bmm_out(out, a, b); }
void mul_into(Tensor out, const Tensor& a, const Tensor& b) { at::mul_out(out, a, b); }

Tensor causal_mask(int64_t c, const Tensor& like) {
  return at::ones({c, c}, like.options().dtype(at::kBool)).tril();
}

// (I + tril(m, -1))^{-1} for m [R, C, C], by recursive inversion over tiles (see unit_lower_inverse in Python).
Tensor unit_lower_inverse(const Tensor& m) {
  const int64_t c = m.size(-1);
  int64_t c2 = 1;
  while (c2 < c) c2 <<= 1;
  Tensor mm = c2 == c ? m.contiguous() : at::constant_pad_nd(m, {0, c2 - c, 0, c2 - c}, 0).contiguous();
  const int64_t nb = mm.size(0);
  Tensor inv = at::eye(c2, m.options()).expand({nb, c2, c2}).contiguous();
  for (int64_t s = 1; s < c2; s *= 2) {
    const int64_t w = 2 * s;
    std::vector<int64_t> shape{nb, c2 / w, w, w}, stride{c2 * c2, w * c2 + w, c2, 1};
    Tensor mb = mm.as_strided(shape, stride, mm.storage_offset());
    Tensor ib = inv.as_strided(shape, stride, inv.storage_offset());
    Tensor lower = ib.slice(-2, s, w).slice(-1, 0, s);
    if (s == 1) {
      lower.copy_(mb.slice(-2, s, w).slice(-1, 0, s).neg());
    } else {
      Tensor prod = at::matmul(at::matmul(ib.slice(-2, s, w).slice(-1, s, w), mb.slice(-2, s, w).slice(-1, 0, s)),
                               ib.slice(-2, 0, s).slice(-1, 0, s));
      lower.copy_(prod.neg_());
    }
  }
  return c2 == c ? inv : inv.slice(1, 0, c).slice(2, 0, c);
}

void blas_gemm(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a, int lda,
               const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
void blas_gemm(const char* ta, const char* tb, int m, int n, int k, double alpha, const double* a, int lda,
               const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C [M, N] = alpha op(A) op(B) + beta C for contiguous row-major matrices; op(X) = X^T
// when tX (A is then stored [K, M], B [N, K]). Column-major BLAS computes C^T = op(B)^T op(A)^T.
template <typename T>
void gemm_rm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, const T* b, T beta, T* c) {
  blas_gemm(tb ? "T" : "N", ta ? "T" : "N", n, m, k, alpha, b, tb ? k : n, a, ta ? m : k, beta, c, n);
}

// f(g0, g1) on one contiguous range of [0, groups) per thread. Each worker gets the caller's
// thread-local state (grad mode, profiler, ...) and dispatches below autograd: plain tensors in,
// no graph to record.
template <typename F>
void for_group_ranges(int64_t groups, const F& f) {
  const int64_t threads = at::get_num_threads();
  const at::ThreadLocalState caller;
  at::parallel_for(0, groups, (groups + threads - 1) / threads, [&](int64_t g0, int64_t g1) {
    at::ThreadLocalStateGuard tls(caller);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    f(g0, g1);
  });
}

struct Saved {  // full-size tensors, rows of all groups; eb, k_end, d undefined when ungated
  Tensor q, k, v, beta, p, kk, ainv, w, q_dec, k_dec, states, delta, eb, k_end, d;
};

// Rows [r0, r1) of the per-chunk terms: p, kk (decayed), ainv, d, and u (in delta), w, q_dec, k_dec.
void chunk_terms(const Saved& s, const Tensor& b, double scale, int64_t r0, int64_t r1) {
  RECORD_FUNCTION("delta_kernel::chunk_terms", std::vector<c10::IValue>());
  const bool gated = b.defined();
  const int64_t c = s.q.size(1);
  auto rows = [&](const Tensor& x) { return x.slice(0, r0, r1); };
  Tensor q = rows(s.q), k = rows(s.k), v = rows(s.v), bet = rows(s.beta).unsqueeze(-1);
  Tensor p = rows(s.p), kk = rows(s.kk);
  bmm_into(p, q, mT(k));
  bmm_into(kk, k, mT(k));
  if (!gated) {
    p.masked_fill_(causal_mask(c, q).logical_not(), 0.0).mul_(scale);
  } else {
    Tensor br = rows(b), d = rows(s.d);
    at::sub_out(d, br.unsqueeze(-1), br.unsqueeze(-2));
    d.masked_fill_(causal_mask(c, q).logical_not(), -std::numeric_limits<double>::infinity()).exp_();
    p.mul_(d).mul_(scale);
    kk.mul_(d);
  }
  Tensor ainv = rows(s.ainv);
  ainv.copy_(unit_lower_inverse(kk * bet));
  bmm_into(rows(s.delta), ainv, v * bet);
  if (!gated) {
    bmm_into(rows(s.w), ainv, k * bet);
  } else {
    Tensor eb = rows(s.eb);
    bmm_into(rows(s.w), ainv, k * (bet * eb));
    mul_into(rows(s.q_dec), q, eb * scale);
    mul_into(rows(s.k_dec), k, rows(s.k_end));
  }
}

// The forward loop over the chunks of groups [g0, g1), one group at a time:
// delta_i -= W_i S_i, S_{i+1} = gamma_i S_i + K'_i^T delta_i (S_N goes to final).
template <typename T>
void scan_forward(const Saved& s, const Tensor& s0, const Tensor& final, int64_t n, int64_t g0, int64_t g1) {
  RECORD_FUNCTION("delta_kernel::scan_fwd", std::vector<c10::IValue>());
  const int c = s.q.size(1), dk = s.q.size(2), dv = s.v.size(2), sz = dk * dv;
  T* delta = s.delta.data_ptr<T>();
  const T *w = s.w.data_ptr<T>(), *kdec = s.k_dec.data_ptr<T>();
  const T* eb = s.eb.defined() ? s.eb.data_ptr<T>() : nullptr;
  T *states = s.states.data_ptr<T>(), *fin = final.data_ptr<T>();
  const T* init = s0.data_ptr<T>();
  for (int64_t g = g0; g < g1; ++g) {
    std::copy(init + g * sz, init + (g + 1) * sz, states + g * n * sz);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = g * n + i;
      T *d = delta + row * c * dv, *st = states + row * sz, *nxt = i + 1 < n ? st + sz : fin + g * sz;
      gemm_rm<T>(false, false, c, dv, dk, T(-1), w + row * c * dk, st, T(1), d);
      const T gamma = eb ? eb[row * c + c - 1] : T(1);
      for (int j = 0; j < sz; ++j) nxt[j] = gamma * st[j];
      gemm_rm<T>(true, false, dk, dv, c, T(1), kdec + row * c * dk, d, T(1), nxt);
    }
  }
}

std::vector<Tensor> delta_chunk_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                        const std::optional<Tensor>& g, const Tensor& s0, int64_t n, double scale,
                                        int64_t tile_rows) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "delta_chunk_forward: contiguous [G*N, C, d] inputs expected");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t ng = q.size(0), c = q.size(1), dk = q.size(2), dv = v.size(2), groups = ng / n;
  const bool gated = g.has_value();
  Saved s;
  s.q = q, s.k = k, s.v = v, s.beta = beta.contiguous();
  s.p = at::empty({ng, c, c}, q.options()), s.kk = at::empty({ng, c, c}, q.options());
  s.ainv = at::empty({ng, c, c}, q.options());
  s.w = at::empty({ng, c, dk}, q.options()), s.delta = at::empty({ng, c, dv}, q.options());
  s.states = at::empty({groups, n, dk, dv}, q.options());
  Tensor b, final = at::empty({groups, dk, dv}, q.options());
  if (gated) {
    b = g->cumsum(-1);
    s.eb = b.exp().unsqueeze(-1);
    s.k_end = (b.slice(1, c - 1, c) - b).exp_().unsqueeze(-1);
    s.d = at::empty({ng, c, c}, q.options());
    s.q_dec = at::empty_like(q), s.k_dec = at::empty_like(k);
  } else {
    s.q_dec = q, s.k_dec = k;
  }
  Tensor o = at::empty({ng, c, dv}, q.options()), s_in = s.states.view({ng, dk, dv}), s0c = s0.contiguous();
  for_group_ranges(groups, [&](int64_t g0, int64_t g1) {
    for (int64_t r = g0 * n; r < g1 * n; r += tile_rows) {
      chunk_terms(s, b, scale, r, std::min(r + tile_rows, g1 * n));
    }
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "delta_scan_forward",
                               [&] { scan_forward<scalar_t>(s, s0c, final, n, g0, g1); });
    for (int64_t r = g0 * n; r < g1 * n; r += tile_rows) {
      RECORD_FUNCTION("delta_kernel::output", std::vector<c10::IValue>());
      const int64_t r1 = std::min(r + tile_rows, g1 * n);
      Tensor orow = o.slice(0, r, r1);
      bmm_into(orow, s.p.slice(0, r, r1), s.delta.slice(0, r, r1));
      orow.baddbmm_(s.q_dec.slice(0, r, r1), s_in.slice(0, r, r1), 1.0, gated ? 1.0 : scale);
    }
  });
  std::vector<Tensor> out{o, final, q, k, v, s.beta, s.p, s.kk, s.ainv, s.w, s.q_dec, s.k_dec, s.states, s.delta};
  if (gated) {
    out.insert(out.end(), {s.eb, s.k_end, s.d});
  }
  return out;
}

struct Grads {  // full-size outputs
  Tensor d_q, d_k, d_v, d_beta, d_g;
};

// Gradients of q, k, v, beta, g for rows [r0, r1), given the loop's results (see _input_grads).
void input_grads(const Saved& s, double scale, const Tensor& d_o_all, const Tensor& d_delta_all,
                 const Tensor& g_next_all, const Grads& out, int64_t r0, int64_t r1) {
  RECORD_FUNCTION("delta_kernel::input_grads", std::vector<c10::IValue>());
  auto rows = [&](const Tensor& x) { return x.slice(0, r0, r1); };
  const bool gated = s.d.defined();
  Tensor d_o = rows(d_o_all), d_delta = rows(d_delta_all), g_next = rows(g_next_all);
  Tensor s_in = rows(s.states.view({-1, s.states.size(2), s.states.size(3)}));
  Tensor q = rows(s.q), k = rows(s.k), v = rows(s.v), beta = rows(s.beta), p = rows(s.p), kkd = rows(s.kk);
  Tensor ainv = rows(s.ainv), k_dec = rows(s.k_dec), delta = rows(s.delta);
  const int64_t c = d_o.size(1);
  // Z = A^{-T} dDelta; its and dO's products with delta^T and S^T (separate, so that every
  // result is contiguous: the batched gemm path of baddbmm_ needs that)
  Tensor d_r_u = at::bmm(mT(ainv), d_delta);
  Tensor neg_d_m = at::bmm(d_r_u, mT(delta)).tril_(-1), neg_d_r_w = at::bmm(d_r_u, mT(s_in));
  Tensor d_p = at::bmm(d_o, mT(delta)).masked_fill_(causal_mask(c, q).logical_not(), 0.0);
  Tensor d_qdec = at::bmm(d_o, mT(s_in));
  Tensor d_kdec = at::bmm(delta, mT(g_next));
  Tensor bet = beta.unsqueeze(-1);
  Tensor r_w = rowdot(neg_d_r_w, k).neg_();
  Tensor d_beta = rowdot(d_r_u, v) - rowdot(neg_d_m, kkd);
  Tensor d_kk = neg_d_m.mul_(-bet);
  mul_into(rows(out.d_v), d_r_u, bet);
  // d_q and d_k are written straight into the (contiguous) output rows
  Tensor d_q = rows(out.d_q), d_k = rows(out.d_k);
  if (gated) {
    Tensor eb = rows(s.eb), k_end = rows(s.k_end), d = rows(s.d), eb0 = eb.select(-1, 0);
    Tensor eb_s = eb * scale;
    d_beta += r_w * eb0;
    Tensor zz = d_p * p;
    zz.addcmul_(d_kk, kkd);
    Tensor z_end = rowdot(d_kdec, k_dec);
    Tensor db = zz.sum(-1) - zz.sum(-2) - z_end;
    db += r_w * (beta * eb0) + rowdot(d_qdec, q) * eb_s.select(-1, 0);
    Tensor d_gamma = rowdot(g_next.flatten(1), s_in.flatten(1));
    db.select(1, c - 1) += z_end.sum(-1) + d_gamma * eb0.select(1, c - 1);
    rows(out.d_g).copy_(db.flip(-1).cumsum(-1).flip(-1));
    d_p.mul_(d);
    d_kk.mul_(d);
    mul_into(d_q, d_qdec, eb_s);
    d_q.baddbmm_(d_p, k, 1.0, scale);
    mul_into(d_k, neg_d_r_w, -bet * eb);
    d_k.addcmul_(d_kdec, k_end);
  } else {
    d_beta += r_w;
    at::mul_out(d_q, d_qdec, scale);
    d_q.baddbmm_(d_p, k, 1.0, scale);
    mul_into(d_k, neg_d_r_w, -bet);
    d_k.add_(d_kdec);
  }
  d_k.baddbmm_(mT(d_p), q, 1.0, scale);
  d_k.baddbmm_(d_kk + mT(d_kk), k);
  rows(out.d_beta).copy_(d_beta);
}

// The backward loop over the chunks of groups [g0, g1), one group at a time. d_delta holds the
// outputs' part; g_next[i] (dS_{i+1} of chunk i) and d_s0 are written here:
// d_delta_i += K'_i dS_{i+1},  dS_i = s Q'_i^T dO_i + gamma_i dS_{i+1} - W_i^T d_delta_i,
// with dS_N = d_final and s = scale when ungated (q_dec is then q), else 1.
template <typename T>
void scan_backward(const Saved& s, const Tensor& d_o_all, const Tensor& d_final, const Tensor& d_delta_all,
                   const Tensor& g_next_all, const Tensor& d_s0_all, double scale, int64_t n, int64_t g0, int64_t g1) {
  RECORD_FUNCTION("delta_kernel::scan_bwd", std::vector<c10::IValue>());
  const int c = s.q.size(1), dk = s.q.size(2), dv = s.v.size(2), sz = dk * dv;
  const T *w = s.w.data_ptr<T>(), *kdec = s.k_dec.data_ptr<T>(), *qdec = s.q_dec.data_ptr<T>();
  const T *d_o = d_o_all.data_ptr<T>(), *dfin = d_final.data_ptr<T>();
  const T* eb = s.eb.defined() ? s.eb.data_ptr<T>() : nullptr;
  const T so = eb ? T(1) : T(scale);
  T *d_delta = d_delta_all.data_ptr<T>(), *g_next = g_next_all.data_ptr<T>(), *d_s0 = d_s0_all.data_ptr<T>();
  for (int64_t g = g0; g < g1; ++g) {
    std::copy(dfin + g * sz, dfin + (g + 1) * sz, g_next + (g * n + n - 1) * sz);
    for (int64_t i = n - 1; i >= 0; --i) {
      const int64_t row = g * n + i;
      const T* gn = g_next + row * sz;
      T *dd = d_delta + row * c * dv, *tgt = i > 0 ? g_next + (row - 1) * sz : d_s0 + g * sz;
      gemm_rm<T>(false, false, c, dv, dk, T(1), kdec + row * c * dk, gn, T(1), dd);
      gemm_rm<T>(true, false, dk, dv, c, so, qdec + row * c * dk, d_o + row * c * dv, T(0), tgt);
      const T gamma = eb ? eb[row * c + c - 1] : T(1);
      for (int j = 0; j < sz; ++j) tgt[j] += gamma * gn[j];
      gemm_rm<T>(true, false, dk, dv, c, T(-1), w + row * c * dk, dd, T(1), tgt);
    }
  }
}

std::vector<Tensor> delta_chunk_backward(const Tensor& d_o, const Tensor& d_final, at::TensorList saved, int64_t n,
                                         double scale, bool gated, int64_t tile_rows) {
  TORCH_CHECK(saved.size() == (gated ? 15u : 12u), "delta_chunk_backward: wrong number of saved tensors");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Saved s;
  s.q = saved[0], s.k = saved[1], s.v = saved[2], s.beta = saved[3], s.p = saved[4], s.kk = saved[5];
  s.ainv = saved[6], s.w = saved[7], s.q_dec = saved[8], s.k_dec = saved[9], s.states = saved[10];
  s.delta = saved[11];
  const int64_t ng = s.q.size(0), c = s.q.size(1), dk = s.q.size(2), dv = s.v.size(2), groups = ng / n;
  if (gated) {
    s.eb = saved[12], s.k_end = saved[13], s.d = saved[14];
  }
  Grads out{at::empty_like(s.q), at::empty_like(s.k), at::empty_like(s.v), at::empty_like(s.beta),
            gated ? at::empty_like(s.beta) : at::empty({0}, s.beta.options())};
  Tensor d_delta = at::empty({ng, c, dv}, d_o.options());
  Tensor g_next = at::empty({groups, n, dk, dv}, d_o.options()), d_s0 = at::empty({groups, dk, dv}, d_o.options());
  for_group_ranges(groups, [&](int64_t g0, int64_t g1) {
    for (int64_t r = g0 * n; r < g1 * n; r += tile_rows) {
      RECORD_FUNCTION("delta_kernel::d_delta_from_outputs", std::vector<c10::IValue>());
      const int64_t r1 = std::min(r + tile_rows, g1 * n);
      bmm_into(d_delta.slice(0, r, r1), mT(s.p.slice(0, r, r1)), d_o.slice(0, r, r1));
    }
    AT_DISPATCH_FLOATING_TYPES(d_o.scalar_type(), "delta_scan_backward", [&] {
      scan_backward<scalar_t>(s, d_o, d_final, d_delta, g_next, d_s0, scale, n, g0, g1);
    });
    Tensor g_rows = g_next.view({ng, dk, dv});
    for (int64_t r = g0 * n; r < g1 * n; r += tile_rows) {
      input_grads(s, scale, d_o, d_delta, g_rows, out, r, std::min(r + tile_rows, g1 * n));
    }
  });
  return {out.d_q, out.d_k, out.d_v, out.d_beta, out.d_g, d_s0};
}

}  // namespace

TORCH_LIBRARY(looplm, m) {
  m.def("delta_chunk_forward(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor s0, int n, float scale, "
        "int tile_rows) -> Tensor[]");
  m.def("delta_chunk_backward(Tensor d_o, Tensor d_final, Tensor[] saved, int n, float scale, bool gated, "
        "int tile_rows) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) {
  m.impl("delta_chunk_forward", delta_chunk_forward);
  m.impl("delta_chunk_backward", delta_chunk_backward);
}
