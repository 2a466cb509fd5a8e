// CPU kernel of the DeepCUT contrastive loss; same contract as kernels/contrastive.py.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace deepcut {

// Per-anchor (loss, logsumexp over A, logsumexp over P, |P|) of unit rows u [M, D] against
// candidates [N, D] (or u itself when absent). Inputs may be fp32, fp16 or bf16; math is fp32.
std::vector<at::Tensor> contrastive_forward_cpu(
    const at::Tensor& u, const at::Tensor& labels, const at::Tensor& forget,
    const at::Tensor& instance_ids, const c10::optional<at::Tensor>& candidates,
    const c10::optional<at::Tensor>& candidate_labels, double temperature, bool pull_lse,
    int64_t ignore_index);

// (dL/du, dL/dcandidates) in fp32 from dL/dloss_i and the forward's statistics. In the self
// case dL/du holds both sides and the second is None; a gradient not asked for is None.
// per_thread_budget_bytes caps the per-thread copies of the candidate gradient: above it the
// candidate side is recomputed in a second pass instead (slower, no extra memory).
std::vector<c10::optional<at::Tensor>> contrastive_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& u, const at::Tensor& labels,
    const at::Tensor& forget, const at::Tensor& instance_ids,
    const c10::optional<at::Tensor>& candidates, const c10::optional<at::Tensor>& candidate_labels,
    const at::Tensor& lse_a, const at::Tensor& lse_p, const at::Tensor& count, double temperature,
    bool pull_lse, int64_t ignore_index, bool need_anchor_grad, bool need_candidate_grad,
    double per_thread_budget_bytes);

}  // namespace deepcut
