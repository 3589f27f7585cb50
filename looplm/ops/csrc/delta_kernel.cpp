// The delta rule's chunk form (forward and backward), each thread on its own range of groups.
// The math and the names follow looplm/ops/delta_chunkwise.py line by line (its PyTorch form is
// the reference); looplm/ops/delta_kernel.py says why this exists. Layout: group-major rows
// [G*N, C, d] (group g owns rows g*N .. g*N+N-1), states [G, N, dk, dv].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace {

using at::Tensor;

Tensor rowdot(const Tensor& a, const Tensor& b) { return (a * b).sum(-1); }

Tensor mT(const Tensor& x) { return x.transpose(-1, -2); }

// at::*_out take the output by non-const reference; these take views (temporaries) of it.
void bmm_into(Tensor out, const Tensor& a, const Tensor& b) { at::bmm_out(out, a, b); }
void mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }
void mul_into(Tensor out, const Tensor& a, const Tensor& b) { at::mul_out(out, a, b); }

Tensor causal_mask(int64_t c, const Tensor& like) {
  return at::ones({c, c}, like.options().dtype(at::kBool)).tril();
}

// (I + tril(m, -1))^{-1} for m [R, C, C], by block recursion (see unit_lower_inverse in Python).
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

struct Saved {  // full-size tensors, rows of all groups; eb, k_end, d undefined when ungated
  Tensor q, k, v, beta, p, kk, ainv, w, q_dec, k_dec, states, delta, eb, k_end, d;
};

// Rows [r0, r1) of the per-chunk terms: p, kk (decayed), ainv, d, and u (in delta), w, q_dec, k_dec.
void chunk_terms(const Saved& s, const Tensor& b, double scale, int64_t r0, int64_t r1) {
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

// The forward loop over the chunks of groups [g0, g1) (batched over those groups).
void scan_forward(const Saved& s, const Tensor& gamma, const Tensor& s0, const Tensor& final, int64_t n,
                  int64_t g0, int64_t g1) {
  const int64_t c = s.q.size(1), dk = s.q.size(2), dv = s.v.size(2), len = g1 - g0;
  auto grp = [&](const Tensor& x, int64_t d) { return x.slice(0, g0 * n, g1 * n).view({len, n, c, d}); };
  Tensor delta = grp(s.delta, dv), w = grp(s.w, dk), kdec = grp(s.k_dec, dk);
  Tensor states = s.states.slice(0, g0, g1), fin = final.slice(0, g0, g1);
  Tensor gam = gamma.defined() ? gamma.slice(0, g0, g1) : Tensor();
  states.select(1, 0).copy_(s0.slice(0, g0, g1));
  for (int64_t i = 0; i < n; ++i) {
    Tensor st = states.select(1, i), nxt = i + 1 < n ? states.select(1, i + 1) : fin, d = delta.select(1, i);
    d.baddbmm_(w.select(1, i), st, 1.0, -1.0);
    if (gam.defined()) {
      mul_into(nxt, st, gam.select(1, i).view({len, 1, 1}));
    } else {
      nxt.copy_(st);
    }
    nxt.baddbmm_(mT(kdec.select(1, i)), d);
  }
}

std::vector<Tensor> delta_chunk_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                        const std::optional<Tensor>& g, const Tensor& s0, int64_t n, double scale,
                                        int64_t block_rows) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "delta_chunk_forward: contiguous [G*N, C, d] inputs expected");
  const int64_t ng = q.size(0), c = q.size(1), dk = q.size(2), dv = v.size(2), groups = ng / n;
  const bool gated = g.has_value();
  Saved s;
  s.q = q, s.k = k, s.v = v, s.beta = beta.contiguous();
  s.p = at::empty({ng, c, c}, q.options()), s.kk = at::empty({ng, c, c}, q.options());
  s.ainv = at::empty({ng, c, c}, q.options());
  s.w = at::empty({ng, c, dk}, q.options()), s.delta = at::empty({ng, c, dv}, q.options());
  s.states = at::empty({groups, n, dk, dv}, q.options());
  Tensor b, gamma, final = at::empty({groups, dk, dv}, q.options());
  if (gated) {
    b = g->cumsum(-1);
    s.eb = b.exp().unsqueeze(-1);
    s.k_end = (b.slice(1, c - 1, c) - b).exp_().unsqueeze(-1);
    s.d = at::empty({ng, c, c}, q.options());
    s.q_dec = at::empty_like(q), s.k_dec = at::empty_like(k);
    gamma = s.eb.view({groups, n, c}).select(2, c - 1);
  } else {
    s.q_dec = q, s.k_dec = k;
  }
  Tensor o = at::empty({ng, c, dv}, q.options()), s_in = s.states.view({ng, dk, dv});
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, groups, (groups + threads - 1) / threads, [&](int64_t g0, int64_t g1) {
    for (int64_t r = g0 * n; r < g1 * n; r += block_rows) {
      chunk_terms(s, b, scale, r, std::min(r + block_rows, g1 * n));
    }
    scan_forward(s, gamma, s0, final, n, g0, g1);
    for (int64_t r = g0 * n; r < g1 * n; r += block_rows) {
      const int64_t r1 = std::min(r + block_rows, g1 * n);
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

// The backward loop over the chunks of groups [g0, g1): d_delta and g_next (dS_{i+1} of chunk i)
// hold the outputs' parts and receive what flows back through the state; d_s0 receives dS_0.
void scan_backward(const Saved& s, const Tensor& gamma, const Tensor& d_delta_all, const Tensor& g_next_all,
                   const Tensor& d_s0_all, int64_t n, int64_t g0, int64_t g1) {
  const int64_t c = s.q.size(1), dk = s.q.size(2), dv = s.v.size(2), len = g1 - g0;
  auto grp = [&](const Tensor& x, int64_t d) { return x.slice(0, g0 * n, g1 * n).view({len, n, c, d}); };
  Tensor d_delta = grp(d_delta_all, dv), w = grp(s.w, dk), kdec = grp(s.k_dec, dk);
  Tensor g_next = g_next_all.slice(0, g0, g1), d_s0 = d_s0_all.slice(0, g0, g1);
  Tensor gam = gamma.defined() ? gamma.slice(0, g0, g1) : Tensor();
  for (int64_t i = n - 1; i >= 0; --i) {
    Tensor gn = g_next.select(1, i), tgt = i > 0 ? g_next.select(1, i - 1) : d_s0, dd = d_delta.select(1, i);
    dd.baddbmm_(kdec.select(1, i), gn);
    if (gam.defined()) {
      tgt.addcmul_(gn, gam.select(1, i).view({len, 1, 1}));
    } else {
      tgt.add_(gn);
    }
    tgt.baddbmm_(mT(w.select(1, i)), dd, 1.0, -1.0);
  }
}

std::vector<Tensor> delta_chunk_backward(const Tensor& d_o, const Tensor& d_final, at::TensorList saved, int64_t n,
                                         double scale, bool gated, int64_t block_rows) {
  TORCH_CHECK(saved.size() == (gated ? 15u : 12u), "delta_chunk_backward: wrong number of saved tensors");
  Saved s;
  s.q = saved[0], s.k = saved[1], s.v = saved[2], s.beta = saved[3], s.p = saved[4], s.kk = saved[5];
  s.ainv = saved[6], s.w = saved[7], s.q_dec = saved[8], s.k_dec = saved[9], s.states = saved[10];
  s.delta = saved[11];
  Tensor gamma;
  const int64_t ng = s.q.size(0), c = s.q.size(1), dk = s.q.size(2), dv = s.v.size(2), groups = ng / n;
  if (gated) {
    s.eb = saved[12], s.k_end = saved[13], s.d = saved[14];
    gamma = s.eb.view({groups, n, c}).select(2, c - 1);
  }
  Grads out{at::empty_like(s.q), at::empty_like(s.k), at::empty_like(s.v), at::empty_like(s.beta),
            gated ? at::empty_like(s.beta) : at::empty({0}, s.beta.options())};
  Tensor d_delta = at::empty({ng, c, dv}, d_o.options());
  Tensor g_next = at::empty({groups, n, dk, dv}, d_o.options()), d_s0 = at::empty({groups, dk, dv}, d_o.options());
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, groups, (groups + threads - 1) / threads, [&](int64_t g0, int64_t g1) {
    for (int64_t r = g0 * n; r < g1 * n; r += block_rows) {
      const int64_t r1 = std::min(r + block_rows, g1 * n);
      bmm_into(d_delta.slice(0, r, r1), mT(s.p.slice(0, r, r1)), d_o.slice(0, r, r1));
    }
    for (int64_t gi = g0; gi < g1; ++gi) {  // d o_i / d S_i lands in dS_i's slot: g_next[i-1] or d_s0
      Tensor qd = s.q_dec.slice(0, gi * n, gi * n + n), dog = d_o.slice(0, gi * n, gi * n + n);
      if (n > 1) {
        bmm_into(g_next[gi].slice(0, 0, n - 1), mT(qd.slice(0, 1, n)), dog.slice(0, 1, n));
      }
      mm_into(d_s0[gi], mT(qd[0]), dog[0]);
      if (!gated) {
        g_next[gi].slice(0, 0, n - 1).mul_(scale);
        d_s0[gi].mul_(scale);
      }
      g_next[gi][n - 1].copy_(d_final[gi]);
    }
    scan_backward(s, gamma, d_delta, g_next, d_s0, n, g0, g1);
    Tensor g_rows = g_next.view({ng, dk, dv});
    for (int64_t r = g0 * n; r < g1 * n; r += block_rows) {
      input_grads(s, scale, d_o, d_delta, g_rows, out, r, std::min(r + block_rows, g1 * n));
    }
  });
  return {out.d_q, out.d_k, out.d_v, out.d_beta, out.d_g, d_s0};
}

}  // namespace

TORCH_LIBRARY(looplm, m) {
  m.def("delta_chunk_forward(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor s0, int n, float scale, "
        "int block_rows) -> Tensor[]");
  m.def("delta_chunk_backward(Tensor d_o, Tensor d_final, Tensor[] saved, int n, float scale, bool gated, "
        "int block_rows) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(looplm, CPU, m) {
  m.impl("delta_chunk_forward", delta_chunk_forward);
  m.impl("delta_chunk_backward", delta_chunk_backward);
}
