// Fused CPU kernel of the DeepCUT contrastive loss (docs/spec.md, section 2).
//
// Same contract as the Triton kernels (kernels/contrastive.py): the forward returns per-anchor
// loss, log-sum-exp over A(i), log-sum-exp over P(i) and |P(i)|; the backward recomputes the
// similarities from them. Work is split into blocks of anchors x blocks of candidates. Each
// tile's similarities come from one BLAS product (at::mm_out on fp32 rows) into a per-task
// buffer, and the masks, the online log-sum-exps and dL/ds are fused loops over that tile.
// Working memory is O((M + N) * D) for fp32 copies and gradients, plus
// threads * kAnchorBlock * kCandidateBlock: never M x N.
//
// Parallelism uses at::parallel_for (OpenMP in torch's CPU builds); BLAS calls inside it run
// single-threaded. The backward walks anchor blocks in parallel, computes each dL/ds tile once
// and feeds both products: the anchor gradient goes to rows the task owns, the candidate
// gradient to a per-thread buffer summed at the end. When those buffers would exceed
// per_thread_budget_bytes (many threads x many candidates), a second pass over candidate blocks
// recomputes the tiles instead, again writing only rows it owns. No races either way.
#include "contrastive_cpu.h"

#include "../pair_rules.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace deepcut {
namespace {

constexpr int64_t kAnchorBlock = 256;
constexpr int64_t kCandidateBlock = 512;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Labels, forget flags and instance ids of the anchors and of the candidates.
struct Rows {
  const int64_t* label;
  const uint8_t* forget;
  const int64_t* inst;
};

struct Problem {
  at::Tensor u, c;  // fp32, contiguous; c aliases u in the self case
  at::Tensor labels, forget, inst, c_labels;
  Rows anchors, cands;
  int64_t M, N, D;
  bool self_case, pull_lse;
  int64_t ignore;
  float inv_tau;
};

Problem make_problem(const at::Tensor& u, const at::Tensor& labels, const at::Tensor& forget,
                     const at::Tensor& inst, const c10::optional<at::Tensor>& candidates,
                     const c10::optional<at::Tensor>& candidate_labels, double temperature,
                     bool pull_lse, int64_t ignore_index) {
  Problem p;
  p.self_case = !candidates.has_value();
  p.u = u.detach().to(at::kFloat).contiguous();
  p.c = p.self_case ? p.u : candidates->detach().to(at::kFloat).contiguous();
  p.labels = labels.to(at::kLong).contiguous();
  p.forget = forget.to(at::kByte).contiguous();
  p.inst = inst.to(at::kLong).contiguous();
  p.c_labels = p.self_case ? p.labels : candidate_labels->to(at::kLong).contiguous();
  p.anchors = {p.labels.data_ptr<int64_t>(), p.forget.data_ptr<uint8_t>(), p.inst.data_ptr<int64_t>()};
  // a candidate bank is all retain rows: its forget flags and ids are never read
  p.cands = p.self_case ? p.anchors : Rows{p.c_labels.data_ptr<int64_t>(), nullptr, nullptr};
  p.M = p.u.size(0);
  p.N = p.c.size(0);
  p.D = p.u.size(1);
  p.pull_lse = pull_lse;
  p.ignore = ignore_index;
  p.inv_tau = static_cast<float>(1.0 / temperature);
  return p;
}

// kInA / kInP bits of the pair (anchor i, candidate j); see pair_rules.h.
inline uint8_t pair_flags(const Problem& p, int64_t i, int64_t j) {
  const bool c_forget = p.self_case && p.cands.forget[j] != 0;
  const int64_t c_inst = p.self_case ? p.cands.inst[j] : 0;
  return deepcut::pair_flags(p.self_case, p.ignore, p.anchors.label[i], p.anchors.forget[i] != 0,
                             p.anchors.inst[i], i, p.cands.label[j], c_forget, c_inst, j);
}

// Similarities of rows [r0, r0 + nr) of x with rows [k0, k0 + nk) of y, divided by tau,
// written into buf as an nr x nk row-major tile.
float* similarity_tile(const at::Tensor& x, int64_t r0, int64_t nr, const at::Tensor& y,
                       int64_t k0, int64_t nk, float inv_tau, std::vector<float>& buf) {
  at::Tensor out = at::from_blob(buf.data(), {nr, nk}, at::kFloat);
  at::mm_out(out, x.narrow(0, r0, nr), y.narrow(0, k0, nk).t());
  float* s = buf.data();
  for (int64_t e = 0; e < nr * nk; ++e) s[e] *= inv_tau;
  return s;
}

// Streaming log-sum-exp: fold one more tile's values (already masked to -inf) into (m, l).
inline void online_lse(float& m, float& l, const float* v, const uint8_t* flags, uint8_t bit,
                       int64_t n) {
  float tile_max = kNegInf;
  for (int64_t k = 0; k < n; ++k)
    if (flags[k] & bit) tile_max = std::max(tile_max, v[k]);
  if (tile_max == kNegInf) return;
  const float m_new = std::max(m, tile_max);
  float sum = 0.f;
  for (int64_t k = 0; k < n; ++k)
    if (flags[k] & bit) sum += std::exp(v[k] - m_new);
  l = l * std::exp(m - m_new) + sum;
  m = m_new;
}

std::vector<AnchorGrad> anchor_grads(const Problem& p, const at::Tensor& grad_loss,
                                     const at::Tensor& lse_a, const at::Tensor& lse_p,
                                     const at::Tensor& count) {
  auto g = grad_loss.to(at::kFloat).contiguous();
  auto la = lse_a.contiguous(), lp = lse_p.contiguous();
  auto cnt = count.to(at::kInt).contiguous();
  const float *gp = g.data_ptr<float>(), *lap = la.data_ptr<float>(), *lpp = lp.data_ptr<float>();
  const int32_t* cp = cnt.data_ptr<int32_t>();
  std::vector<AnchorGrad> out(p.M);
  for (int64_t i = 0; i < p.M; ++i)
    out[i] = {cp[i] > 0 ? gp[i] : 0.f, lap[i], lpp[i], 1.f / std::max(cp[i], 1),
              p.pull_lse && p.anchors.forget[i] != 0};
  return out;
}

// Overwrite a tile of similarities (anchors [i0, i0 + bm) x candidates [j0, j0 + bn)) with
// dL/ds; a transposed tile is stored [candidates, anchors].
void logit_grad_tile(const Problem& p, const std::vector<AnchorGrad>& stats, float* s, int64_t i0,
                     int64_t bm, int64_t j0, int64_t bn, bool transposed) {
  for (int64_t r = 0; r < bm; ++r)
    for (int64_t k = 0; k < bn; ++k) {
      float& v = transposed ? s[k * bm + r] : s[r * bn + k];
      v = logit_grad(v, pair_flags(p, i0 + r, j0 + k), stats[i0 + r]);
    }
}

}  // namespace

std::vector<at::Tensor> contrastive_forward_cpu(
    const at::Tensor& u, const at::Tensor& labels, const at::Tensor& forget,
    const at::Tensor& instance_ids, const c10::optional<at::Tensor>& candidates,
    const c10::optional<at::Tensor>& candidate_labels, double temperature, bool pull_lse,
    int64_t ignore_index) {
  at::NoGradGuard no_grad;  // autograd is the custom op's business
  const Problem p = make_problem(u, labels, forget, instance_ids, candidates, candidate_labels,
                                 temperature, pull_lse, ignore_index);
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.M}, opts), lse_a = at::empty({p.M}, opts),
             lse_p = at::empty({p.M}, opts), count = at::empty({p.M}, opts.dtype(at::kInt));
  float *loss_p = loss.data_ptr<float>(), *lse_a_p = lse_a.data_ptr<float>(),
        *lse_p_p = lse_p.data_ptr<float>();
  int32_t* count_p = count.data_ptr<int32_t>();
  const int64_t blocks = (p.M + kAnchorBlock - 1) / kAnchorBlock;

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(kAnchorBlock * kCandidateBlock);
    std::vector<uint8_t> flags(kCandidateBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kAnchorBlock, bm = std::min(kAnchorBlock, p.M - i0);
      std::vector<float> m_a(bm, kNegInf), l_a(bm, 0.f), m_p(bm, kNegInf), l_p(bm, 0.f),
          pos_sum(bm, 0.f);
      std::vector<int32_t> pos_count(bm, 0);
      for (int64_t j0 = 0; j0 < p.N; j0 += kCandidateBlock) {
        const int64_t bn = std::min(kCandidateBlock, p.N - j0);
        const float* s = similarity_tile(p.u, i0, bm, p.c, j0, bn, p.inv_tau, buf);
        for (int64_t r = 0; r < bm; ++r) {
          const int64_t i = i0 + r;
          const float* row = s + r * bn;
          for (int64_t k = 0; k < bn; ++k) {
            flags[k] = pair_flags(p, i, j0 + k);
            if (flags[k] & kInP) {
              pos_sum[r] += row[k];
              ++pos_count[r];
            }
          }
          online_lse(m_a[r], l_a[r], row, flags.data(), kInA, bn);
          if (pull_lse && p.anchors.forget[i]) online_lse(m_p[r], l_p[r], row, flags.data(), kInP, bn);
        }
      }
      for (int64_t r = 0; r < bm; ++r) {
        const int64_t i = i0 + r;
        const bool counted = pos_count[r] > 0;
        const bool lse_pull = pull_lse && p.anchors.forget[i] && counted;
        const float la = finish_lse(m_a[r], l_a[r]);
        const float lp = lse_pull ? finish_lse(m_p[r], l_p[r]) : 0.f;
        const float pull = lse_pull ? lp : pos_sum[r] / std::max(pos_count[r], 1);
        loss_p[i] = counted ? la - pull : 0.f;
        lse_a_p[i] = la;
        lse_p_p[i] = lp;
        count_p[i] = pos_count[r];
      }
    }
  });
  return {loss, lse_a, lse_p, count};
}

std::vector<c10::optional<at::Tensor>> contrastive_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& u, const at::Tensor& labels,
    const at::Tensor& forget, const at::Tensor& instance_ids,
    const c10::optional<at::Tensor>& candidates, const c10::optional<at::Tensor>& candidate_labels,
    const at::Tensor& lse_a, const at::Tensor& lse_p, const at::Tensor& count, double temperature,
    bool pull_lse, int64_t ignore_index, bool need_anchor_grad, bool need_candidate_grad,
    double per_thread_budget_bytes) {
  at::NoGradGuard no_grad;
  const Problem p = make_problem(u, labels, forget, instance_ids, candidates, candidate_labels,
                                 temperature, pull_lse, ignore_index);
  const std::vector<AnchorGrad> stats = anchor_grads(p, grad_loss, lse_a, lse_p, count);
  const bool need_du = need_anchor_grad;
  const bool need_dc = need_candidate_grad || (p.self_case && need_anchor_grad);
  const int threads = at::get_num_threads();
  // One pass over anchor blocks computes each dL/ds tile once and feeds both products, with
  // the candidate side accumulated in one buffer per thread; if those buffers would exceed
  // the budget, a second pass over candidate blocks recomputes the tiles instead.
  const bool per_thread_dc =
      need_dc && static_cast<double>(threads - 1) * p.N * p.D * sizeof(float) <= per_thread_budget_bytes;
  c10::optional<at::Tensor> du, dc;
  if (need_du) du = at::zeros({p.M, p.D}, at::kFloat);
  if (need_dc) dc = at::zeros({p.N, p.D}, at::kFloat);
  // thread 0 accumulates straight into dc; the others get a buffer when they first need one
  std::vector<at::Tensor> dc_parts(per_thread_dc ? threads : 0);
  if (per_thread_dc) dc_parts[0] = *dc;

  if (need_du || per_thread_dc) {  // parallel over anchor blocks
    const int64_t blocks = (p.M + kAnchorBlock - 1) / kAnchorBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> buf(kAnchorBlock * kCandidateBlock);
      at::Tensor dc_part;
      if (per_thread_dc) {
        at::Tensor& slot = dc_parts[at::get_thread_num()];
        if (!slot.defined()) slot = at::zeros({p.N, p.D}, at::kFloat);
        dc_part = slot;
      }
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kAnchorBlock, bm = std::min(kAnchorBlock, p.M - i0);
        for (int64_t j0 = 0; j0 < p.N; j0 += kCandidateBlock) {
          const int64_t bn = std::min(kCandidateBlock, p.N - j0);
          float* s = similarity_tile(p.u, i0, bm, p.c, j0, bn, p.inv_tau, buf);
          logit_grad_tile(p, stats, s, i0, bm, j0, bn, /*transposed=*/false);
          const at::Tensor ds = at::from_blob(s, {bm, bn}, at::kFloat);
          // du_i = (1/tau) sum_j dL/ds_ij c_j ;  dc_j = (1/tau) sum_i dL/ds_ij u_i
          if (need_du) du->narrow(0, i0, bm).addmm_(ds, p.c.narrow(0, j0, bn), 1.0, p.inv_tau);
          if (per_thread_dc) dc_part.narrow(0, j0, bn).addmm_(ds.t(), p.u.narrow(0, i0, bm), 1.0, p.inv_tau);
        }
      }
    });
  }

  if (per_thread_dc) {
    for (size_t t = 1; t < dc_parts.size(); ++t)
      if (dc_parts[t].defined()) dc->add_(dc_parts[t]);
  } else if (need_dc) {  // parallel over candidate blocks; tiles are [candidates, anchors]
    const int64_t blocks = (p.N + kCandidateBlock - 1) / kCandidateBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> buf(kAnchorBlock * kCandidateBlock);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t j0 = b * kCandidateBlock, bn = std::min(kCandidateBlock, p.N - j0);
        at::Tensor dc_rows = dc->narrow(0, j0, bn);
        for (int64_t i0 = 0; i0 < p.M; i0 += kAnchorBlock) {
          const int64_t bm = std::min(kAnchorBlock, p.M - i0);
          float* st = similarity_tile(p.c, j0, bn, p.u, i0, bm, p.inv_tau, buf);
          logit_grad_tile(p, stats, st, i0, bm, j0, bn, /*transposed=*/true);
          dc_rows.addmm_(at::from_blob(st, {bn, bm}, at::kFloat), p.u.narrow(0, i0, bm), 1.0, p.inv_tau);
        }
      }
    });
  }

  if (p.self_case) {  // both sides are gradients of the same rows
    if (du.has_value()) du->add_(*dc);
    return {du, c10::nullopt};
  }
  return {du, dc};
}

}  // namespace deepcut
