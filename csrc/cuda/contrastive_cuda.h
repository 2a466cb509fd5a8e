// CUDA kernel of the DeepCUT contrastive loss behind torch tensors; same contract as the CPU
// kernel (contrastive_cpu.h). Built only when torch has CUDA.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace deepcut {

std::vector<at::Tensor> contrastive_forward_cuda(
    const at::Tensor& u, const at::Tensor& labels, const at::Tensor& forget,
    const at::Tensor& instance_ids, const c10::optional<at::Tensor>& candidates,
    const c10::optional<at::Tensor>& candidate_labels, double temperature, bool pull_lse,
    int64_t ignore_index);

std::vector<c10::optional<at::Tensor>> contrastive_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& u, const at::Tensor& labels,
    const at::Tensor& forget, const at::Tensor& instance_ids,
    const c10::optional<at::Tensor>& candidates, const c10::optional<at::Tensor>& candidate_labels,
    const at::Tensor& lse_a, const at::Tensor& lse_p, const at::Tensor& count, double temperature,
    bool pull_lse, int64_t ignore_index, bool need_anchor_grad, bool need_candidate_grad);

}  // namespace deepcut
