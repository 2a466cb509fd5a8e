// Torch glue of the CUDA kernels: tensors in, raw pointers to contrastive_cuda.cu, tensors out.
#include "contrastive_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "contrastive_cuda_launch.h"

namespace deepcut {
namespace {

ElementType element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default: TORCH_CHECK(false, "the CUDA kernel takes float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Keeps the converted tensors alive while the kernels read them.
struct Prepared {
  at::Tensor u, c, labels, forget, inst, c_labels;
  CudaProblem problem;
};

Prepared prepare(const at::Tensor& u, const at::Tensor& labels, const at::Tensor& forget,
                 const at::Tensor& instance_ids, const c10::optional<at::Tensor>& candidates,
                 const c10::optional<at::Tensor>& candidate_labels, double temperature, bool pull_lse,
                 int64_t ignore_index) {
  TORCH_CHECK(u.is_cuda(), "the CUDA kernel needs CUDA tensors");
  Prepared r;
  const bool self_case = !candidates.has_value();
  r.u = u.detach().contiguous();
  r.c = self_case ? r.u : candidates->detach().to(u.scalar_type()).contiguous();
  r.labels = labels.to(at::kLong).contiguous();
  r.forget = forget.to(at::kByte).contiguous();
  r.inst = instance_ids.to(at::kLong).contiguous();
  r.c_labels = self_case ? r.labels : candidate_labels->to(at::kLong).contiguous();
  CudaProblem& p = r.problem;
  p.u = r.u.data_ptr();
  p.c = r.c.data_ptr();
  p.M = r.u.size(0);
  p.N = r.c.size(0);
  p.D = r.u.size(1);
  p.a_label = r.labels.data_ptr<int64_t>();
  p.a_forget = r.forget.data_ptr<uint8_t>();
  p.a_inst = r.inst.data_ptr<int64_t>();
  p.c_label = r.c_labels.data_ptr<int64_t>();
  p.c_forget = self_case ? p.a_forget : nullptr;
  p.c_inst = self_case ? p.a_inst : nullptr;
  p.self_case = self_case;
  p.pull_lse = pull_lse;
  p.ignore_index = ignore_index;
  p.inv_tau = static_cast<float>(1.0 / temperature);
  p.type = element_type(r.u);
  return r;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

std::vector<at::Tensor> contrastive_forward_cuda(
    const at::Tensor& u, const at::Tensor& labels, const at::Tensor& forget,
    const at::Tensor& instance_ids, const c10::optional<at::Tensor>& candidates,
    const c10::optional<at::Tensor>& candidate_labels, double temperature, bool pull_lse,
    int64_t ignore_index) {
  at::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard device(u.device());
  const Prepared r = prepare(u, labels, forget, instance_ids, candidates, candidate_labels, temperature,
                             pull_lse, ignore_index);
  const auto opts = u.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({r.problem.M}, opts), lse_a = at::empty({r.problem.M}, opts),
             lse_p = at::empty({r.problem.M}, opts), count = at::empty({r.problem.M}, opts.dtype(at::kInt));
  check(launch_forward(r.problem, loss.data_ptr<float>(), lse_a.data_ptr<float>(), lse_p.data_ptr<float>(),
                       count.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()),
        "deepcut forward kernel");
  return {loss, lse_a, lse_p, count};
}

std::vector<c10::optional<at::Tensor>> contrastive_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& u, const at::Tensor& labels,
    const at::Tensor& forget, const at::Tensor& instance_ids,
    const c10::optional<at::Tensor>& candidates, const c10::optional<at::Tensor>& candidate_labels,
    const at::Tensor& lse_a, const at::Tensor& lse_p, const at::Tensor& count, double temperature,
    bool pull_lse, int64_t ignore_index, bool need_anchor_grad, bool need_candidate_grad) {
  at::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard device(u.device());
  const Prepared r = prepare(u, labels, forget, instance_ids, candidates, candidate_labels, temperature,
                             pull_lse, ignore_index);
  const CudaProblem& p = r.problem;
  const at::Tensor grad = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor la = lse_a.contiguous(), lp = lse_p.contiguous(), cnt = count.to(at::kInt).contiguous();
  const CudaAnchorStats stats{grad.data_ptr<float>(), la.data_ptr<float>(), lp.data_ptr<float>(),
                              cnt.data_ptr<int32_t>()};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = u.options().dtype(at::kFloat);
  const int64_t ld = cols_padded(p.D);
  c10::optional<at::Tensor> du, dc;
  if (need_anchor_grad) {
    at::Tensor padded = at::zeros({rows_padded(p.M), ld}, opts);
    check(launch_backward_anchor(p, stats, padded.data_ptr<float>(), stream), "deepcut anchor backward kernel");
    du = padded.narrow(0, 0, p.M).narrow(1, 0, p.D);
  }
  if (need_candidate_grad || (p.self_case && need_anchor_grad)) {
    at::Tensor padded = at::zeros({rows_padded(p.N), ld}, opts);
    check(launch_backward_candidate(p, stats, padded.data_ptr<float>(), stream),
          "deepcut candidate backward kernel");
    dc = padded.narrow(0, 0, p.N).narrow(1, 0, p.D);
  }
  if (p.self_case) {  // both sides are gradients of the same rows
    if (du.has_value()) du = *du + *dc;
    return {du, c10::nullopt};
  }
  if (du.has_value()) du = du->contiguous();
  if (dc.has_value()) dc = dc->contiguous();
  return {du, dc};
}

}  // namespace deepcut
