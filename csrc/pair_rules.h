// The per-pair rules of the CPU kernel (docs/spec.md, section 2).
#pragma once

#include <cmath>
#include <cstdint>

#define DEEPCUT_HOST_DEVICE inline

namespace deepcut {

constexpr uint8_t kInA = 1;  // bit flags of a pair: in the contrast set A(i) / in the positives P(i)
constexpr uint8_t kInP = 2;

// kInA / kInP bits of the pair (anchor i, candidate j). A candidate bank (not self_case) holds
// retain rows only and excludes nothing; its forget flags and ids are not read.
DEEPCUT_HOST_DEVICE uint8_t pair_flags(bool self_case, int64_t ignore_index, int64_t a_label,
                                       bool a_forget, int64_t a_inst, int64_t i, int64_t c_label,
                                       bool c_forget, int64_t c_inst, int64_t j) {
  if (a_label == ignore_index || c_label == ignore_index) return 0;
  const bool same_class = a_label == c_label;
  if (!self_case) return kInA | ((same_class != a_forget) ? kInP : 0);
  // no self pair; a forget anchor also skips the other views of its own instance
  if (i == j || (a_forget && a_inst == c_inst)) return 0;
  // retain anchors see retain rows only; forget anchors also same-class forget rows
  if (c_forget && !(a_forget && same_class)) return 0;
  return kInA | ((!c_forget && same_class != a_forget) ? kInP : 0);
}

// What the backward needs per anchor.
struct AnchorGrad {
  float coef;  // upstream gradient; 0 for anchors without positives (their loss is constant)
  float lse_a, lse_p, inv_count;
  bool lse_pull;  // forget anchor with forget_pull = "logsumexp"
};

// dL/ds of one pair: coef * (softmax over A - weight as a positive); P(i) is a subset of A(i).
DEEPCUT_HOST_DEVICE float logit_grad(float s, uint8_t flags, const AnchorGrad& a) {
  if (!(flags & kInA) || a.coef == 0.f) return 0.f;
  float positive = 0.f;
  if (flags & kInP) positive = a.lse_pull ? expf(s - a.lse_p) : a.inv_count;
  return a.coef * (expf(s - a.lse_a) - positive);
}

// Natural log-sum-exp from a running (max, sum of exp(x - max)); -inf for an empty set.
DEEPCUT_HOST_DEVICE float finish_lse(float m, float l) { return l > 0.f ? m + logf(l) : -INFINITY; }

}  // namespace deepcut
