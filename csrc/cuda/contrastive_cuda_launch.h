// Raw-pointer launchers of the CUDA kernels. This header (and contrastive_cuda.cu) include only
// CUDA's own headers, so CI can compile the device code with `nvcc -c` on a machine without
// torch's CUDA build; contrastive_cuda.cpp adapts torch tensors to these calls.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deepcut {

enum class ElementType { kFloat32, kFloat16, kBFloat16 };

// One loss problem: unit rows u [M, D] and candidates c [N, D] (c == u in the self case),
// contiguous, in one element type; integer metadata per row (forget flags as bytes).
struct CudaProblem {
  const void* u;
  const void* c;
  int64_t M, N, D;
  const int64_t* a_label;
  const uint8_t* a_forget;
  const int64_t* a_inst;
  const int64_t* c_label;
  const uint8_t* c_forget;  // unused (may be null) for a candidate bank
  const int64_t* c_inst;
  bool self_case, pull_lse;
  int64_t ignore_index;
  float inv_tau;
  ElementType type;
};

// Saved per-anchor statistics and the upstream gradient, as the backward reads them.
struct CudaAnchorStats {
  const float* grad;
  const float* lse_a;
  const float* lse_p;
  const int32_t* count;
};

// Rows of the fp32 gradient outputs are padded: rows_padded(M or N) x cols_padded(D), so that
// tensor-core fragments can read and write whole 16 x 16 tiles in place.
int64_t rows_padded(int64_t rows);
int64_t cols_padded(int64_t cols);

cudaError_t launch_forward(const CudaProblem& p, float* loss, float* lse_a, float* lse_p,
                           int32_t* count, cudaStream_t stream);
// du_padded += (1/tau) dS @ c  (anchor side), zero-initialised by the caller
cudaError_t launch_backward_anchor(const CudaProblem& p, const CudaAnchorStats& stats,
                                   float* du_padded, cudaStream_t stream);
// dc_padded += (1/tau) dS^T @ u  (candidate side), zero-initialised by the caller
cudaError_t launch_backward_candidate(const CudaProblem& p, const CudaAnchorStats& stats,
                                      float* dc_padded, cudaStream_t stream);

}  // namespace deepcut
