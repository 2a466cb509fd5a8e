// Fused CUDA kernels of the DeepCUT contrastive loss (docs/spec.md, section 2), tensor cores via WMMA.
//
// Same contract as the Triton and CPU kernels: the forward writes per-anchor loss, log-sum-exp
// over A(i), log-sum-exp over P(i) and |P(i)|; the backward recomputes similarity tiles from
// them. Every block owns 64 rows (anchors, or candidates for the candidate-side gradient) and
// streams 64-row tiles of the other side:
//   1. similarity tile: 64 x 64 products over D in chunks of 32, staged in shared memory; for
//      bf16/fp16 each of the 4 warps computes a 16 x 64 strip with 16x16x16 WMMA fragments
//      (fp32 accumulate); fp32 inputs use plain FMA, IEEE like torch's default matmul;
//   2. masks and online log-sum-exp (forward) or dL/ds (backward) on that tile: two threads
//      per row, 32 columns each, combined with one shuffle;
//   3. backward only: out[own rows] += (dS / tau) @ other[tile rows], with dS cast to the input
//      dtype for the tensor cores (like FlashAttention's P @ V), accumulating in place in a
//      padded fp32 output that the block alone writes: no atomics.
// Nothing of size M x N exists; shared memory is about 40 KB per block.
//
// This file includes only CUDA headers so CI compiles it with `nvcc -c` without torch.
#include "contrastive_cuda_launch.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "../pair_rules.h"

namespace deepcut {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;      // rows per block and per streamed tile
constexpr int kChunk = 32;     // D elements per staged chunk of the similarity product
constexpr int kThreads = 128;  // 4 warps; warp w owns tile rows [16 w, 16 w + 16)
constexpr int kPad = 8;        // row padding (elements) of staged operands: fewer bank conflicts,
                               // and rows stay 32-byte aligned as WMMA requires
constexpr int kScorePad = 4;

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Backward staging: dS / tau in the input dtype (g) and a 64 x 64 tile of the other side (y).
// For fp32 the scaled dS stays in the fp32 score tile, so only y is needed.
template <typename T> struct GradStage {
  T g[kTile][kTile + kPad];
  T y[kTile][kTile + kPad];
};
template <> struct GradStage<float> {
  float y[kTile][kTile + kPad];
};

template <typename T> struct SharedTiles {
  float score[kTile][kTile + kScorePad];  // similarities / tau, then dL/ds / tau
  union {
    struct {
      T x[kTile][kChunk + kPad];
      T y[kTile][kChunk + kPad];
    } product;
    GradStage<T> grad;
  };
  // metadata of the streamed tile's rows (candidates in the forward and the anchor-side
  // gradient, anchors in the candidate-side gradient)
  int64_t label[kTile];
  int64_t inst[kTile];
  bool forget[kTile];
  AnchorGrad stats[kTile];  // anchors only
};

// score = x[x0 : x0 + 64] . y[y0 : y0 + 64]^T / tau over all D; rows past the end read as 0.
template <typename T>
__device__ void similarity_tile(SharedTiles<T>& sh, const T* __restrict__ x, int64_t x0, int64_t x_rows,
                                const T* __restrict__ y, int64_t y0, int64_t y_rows, int64_t D, float inv_tau) {
  constexpr bool kTensorCores = !std::is_same<T, float>::value;
  const int tid = threadIdx.x, warp = tid / 32, row = tid / 2, col0 = (tid % 2) * (kTile / 2);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
  float simt[kTile / 2];
  if constexpr (kTensorCores) {
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.f);
  } else {
    for (int c = 0; c < kTile / 2; ++c) simt[c] = 0.f;
  }
  for (int64_t k0 = 0; k0 < D; k0 += kChunk) {
    for (int e = tid; e < kTile * kChunk; e += kThreads) {  // consecutive threads: consecutive k
      const int r = e / kChunk, k = e % kChunk;
      const bool k_ok = k0 + k < D;
      sh.product.x[r][k] = (k_ok && x0 + r < x_rows) ? x[(x0 + r) * D + k0 + k] : from_float<T>(0.f);
      sh.product.y[r][k] = (k_ok && y0 + r < y_rows) ? y[(y0 + r) * D + k0 + k] : from_float<T>(0.f);
    }
    __syncthreads();
    if constexpr (kTensorCores) {
      for (int kk = 0; kk < kChunk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, &sh.product.x[16 * warp][kk], kChunk + kPad);
        for (int j = 0; j < 4; ++j) {  // y rows are the columns of the product: col-major B
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, &sh.product.y[16 * j][kk], kChunk + kPad);
          wmma::mma_sync(acc[j], a, b, acc[j]);
        }
      }
    } else {
      for (int k = 0; k < kChunk; ++k) {
        const float a = sh.product.x[row][k];
        for (int c = 0; c < kTile / 2; ++c) simt[c] += a * sh.product.y[col0 + c][k];
      }
    }
    __syncthreads();
  }
  if constexpr (kTensorCores) {
    for (int j = 0; j < 4; ++j) {
      for (int t = 0; t < acc[j].num_elements; ++t) acc[j].x[t] *= inv_tau;
      wmma::store_matrix_sync(&sh.score[16 * warp][16 * j], acc[j], kTile + kScorePad, wmma::mem_row_major);
    }
  } else {
    for (int c = 0; c < kTile / 2; ++c) sh.score[row][col0 + c] = simt[c] * inv_tau;
  }
  __syncthreads();
}

// out[out0 : out0 + 64, :] += G @ y[y0 : y0 + 64, :], G = the 64 x 64 scaled dL/ds tile in
// shared memory (rows: this block's rows). out is fp32, padded (cols_padded(D) columns, whole
// 64-row blocks), and only this block writes these rows.
template <typename T>
__device__ void accumulate_gradient(SharedTiles<T>& sh, const T* __restrict__ y, int64_t y0, int64_t y_rows,
                                    int64_t D, float* __restrict__ out, int64_t out0, int64_t ld) {
  const int tid = threadIdx.x, warp = tid / 32, row = tid / 2, col0 = (tid % 2) * (kTile / 2);
  for (int64_t d0 = 0; d0 < ld; d0 += kTile) {
    for (int e = tid; e < kTile * kTile; e += kThreads) {
      const int k = e / kTile, c = e % kTile;  // k: streamed row (reduction), c: feature
      sh.grad.y[k][c] = (y0 + k < y_rows && d0 + c < D) ? y[(y0 + k) * D + d0 + c] : from_float<T>(0.f);
    }
    __syncthreads();
    if constexpr (!std::is_same<T, float>::value) {
      for (int j = 0; j < 4; ++j) {
        float* tile = out + (out0 + 16 * warp) * ld + d0 + 16 * j;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, tile, ld, wmma::mem_row_major);
        for (int kk = 0; kk < kTile; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(a, &sh.grad.g[16 * warp][kk], kTile + kPad);
          wmma::load_matrix_sync(b, &sh.grad.y[kk][16 * j], kTile + kPad);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(tile, acc, ld, wmma::mem_row_major);
      }
    } else {
      float* out_row = out + (out0 + row) * ld + d0 + col0;
      for (int c = 0; c < kTile / 2; ++c) {
        float sum = 0.f;
        for (int k = 0; k < kTile; ++k) sum += sh.score[row][k] * sh.grad.y[k][col0 + c];
        out_row[c] += sum;
      }
    }
    __syncthreads();
  }
}

// Store dL/ds / tau of this thread's half row where accumulate_gradient reads it.
template <typename T>
__device__ __forceinline__ void put_gradient(SharedTiles<T>& sh, int row, int col, float value) {
  if constexpr (std::is_same<T, float>::value) {
    sh.score[row][col] = value;
  } else {
    sh.grad.g[row][col] = from_float<T>(value);
  }
}

// Both threads of a row pair (lanes 2r and 2r + 1) get the combined value.
__device__ __forceinline__ float pair_max(float v) { return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1)); }
__device__ __forceinline__ float pair_sum(float v) { return v + __shfl_xor_sync(0xffffffffu, v, 1); }

// Stage labels, forget flags and ids of the streamed tile's rows [r0, r0 + 64).
template <typename T>
__device__ void stage_rows(SharedTiles<T>& sh, const int64_t* label, const uint8_t* forget, const int64_t* inst,
                           int64_t r0, int64_t rows, int64_t ignore_index) {
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const bool ok = r0 + r < rows;
    sh.label[r] = ok ? label[r0 + r] : ignore_index;
    sh.forget[r] = ok && forget != nullptr && forget[r0 + r] != 0;
    sh.inst[r] = (ok && inst != nullptr) ? inst[r0 + r] : -1;
  }
}

// This thread's row of the block (two threads per row, 32 columns each) and its metadata.
struct OwnRow {
  int row, col0;
  int64_t index, label, inst;
  bool valid, forget;
};

__device__ __forceinline__ OwnRow own_row(int64_t rows, const int64_t* label, const uint8_t* forget,
                                          const int64_t* inst, int64_t ignore_index) {
  OwnRow r;
  r.row = threadIdx.x / 2;
  r.col0 = (threadIdx.x % 2) * (kTile / 2);
  r.index = static_cast<int64_t>(blockIdx.x) * kTile + r.row;
  r.valid = r.index < rows;
  r.label = r.valid ? label[r.index] : ignore_index;
  r.forget = r.valid && forget != nullptr && forget[r.index] != 0;
  r.inst = (r.valid && inst != nullptr) ? inst[r.index] : -1;
  return r;
}

// Candidate metadata of the tile at j0 (a candidate bank has no forget flags or ids).
template <typename T>
__device__ __forceinline__ void stage_candidates(SharedTiles<T>& sh, const CudaProblem& p, int64_t j0) {
  stage_rows(sh, p.c_label, p.self_case ? p.c_forget : nullptr, p.self_case ? p.c_inst : nullptr, j0, p.N,
             p.ignore_index);
}

__device__ __forceinline__ AnchorGrad anchor_grad(const CudaProblem& p, const CudaAnchorStats& s, int64_t i) {
  if (i >= p.M) return AnchorGrad{0.f, 0.f, 0.f, 1.f, false};
  const int32_t count = s.count[i];
  return AnchorGrad{count > 0 ? s.grad[i] : 0.f, s.lse_a[i], s.lse_p[i], 1.f / (count > 0 ? count : 1),
                    p.pull_lse && p.a_forget[i] != 0};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(CudaProblem p, float* loss, float* lse_a_out,
                                                           float* lse_p_out, int32_t* count_out) {
  __shared__ __align__(128) SharedTiles<T> sh;
  const OwnRow a = own_row(p.M, p.a_label, p.a_forget, p.a_inst, p.ignore_index);
  const int row = a.row, col0 = a.col0;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile, i = a.index;
  const bool lse_pull = p.pull_lse && a.forget;
  const T* u = static_cast<const T*>(p.u);
  const T* c = static_cast<const T*>(p.c);

  float m_a = -INFINITY, l_a = 0.f, m_p = -INFINITY, l_p = 0.f, pos_sum = 0.f;
  int pos_count = 0;
  for (int64_t j0 = 0; j0 < p.N; j0 += kTile) {
    stage_candidates(sh, p, j0);
    similarity_tile(sh, u, i0, p.M, c, j0, p.N, p.D, p.inv_tau);
    uint8_t flags[kTile / 2];
    float max_a = -INFINITY, max_p = -INFINITY;
    for (int k = 0; k < kTile / 2; ++k) {
      const int col = col0 + k;
      flags[k] = pair_flags(p.self_case, p.ignore_index, a.label, a.forget, a.inst, i, sh.label[col],
                            sh.forget[col], sh.inst[col], j0 + col);
      const float s = sh.score[row][col];
      if (flags[k] & kInA) max_a = fmaxf(max_a, s);
      if (flags[k] & kInP) {
        pos_sum += s;
        ++pos_count;
        max_p = fmaxf(max_p, s);
      }
    }
    // streaming log-sum-exps; every lane takes part in the shuffles
    const float new_a = fmaxf(m_a, pair_max(max_a));
    const float new_p = fmaxf(m_p, pair_max(max_p));
    float sum_a = 0.f, sum_p = 0.f;
    for (int k = 0; k < kTile / 2; ++k) {
      const float s = sh.score[row][col0 + k];
      if (flags[k] & kInA) sum_a += expf(s - new_a);
      if (lse_pull && (flags[k] & kInP)) sum_p += expf(s - new_p);
    }
    sum_a = pair_sum(sum_a);
    sum_p = pair_sum(sum_p);
    if (new_a != -INFINITY) l_a = l_a * expf(m_a - new_a) + sum_a;
    if (new_p != -INFINITY) l_p = l_p * expf(m_p - new_p) + sum_p;
    m_a = new_a;
    m_p = new_p;
    __syncthreads();  // the next tile overwrites the staged metadata
  }
  pos_sum = pair_sum(pos_sum);
  pos_count += __shfl_xor_sync(0xffffffffu, pos_count, 1);
  if (a.valid && threadIdx.x % 2 == 0) {
    const bool counted = pos_count > 0;
    const float la = finish_lse(m_a, l_a);
    const float lp = (lse_pull && counted) ? finish_lse(m_p, l_p) : 0.f;
    const float pull = (lse_pull && counted) ? lp : pos_sum / (pos_count > 0 ? pos_count : 1);
    loss[i] = counted ? la - pull : 0.f;
    lse_a_out[i] = la;
    lse_p_out[i] = lp;
    count_out[i] = pos_count;
  }
}

// du[own anchors] += (1/tau) sum over candidate tiles of dS @ c
template <typename T>
__global__ void __launch_bounds__(kThreads) backward_anchor_kernel(CudaProblem p, CudaAnchorStats stats,
                                                                   float* du, int64_t ld) {
  __shared__ __align__(128) SharedTiles<T> sh;
  const OwnRow a = own_row(p.M, p.a_label, p.a_forget, p.a_inst, p.ignore_index);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const AnchorGrad grad = anchor_grad(p, stats, a.index);
  const T* u = static_cast<const T*>(p.u);
  const T* c = static_cast<const T*>(p.c);
  for (int64_t j0 = 0; j0 < p.N; j0 += kTile) {
    stage_candidates(sh, p, j0);
    similarity_tile(sh, u, i0, p.M, c, j0, p.N, p.D, p.inv_tau);
    for (int k = 0; k < kTile / 2; ++k) {
      const int col = a.col0 + k;
      const uint8_t f = pair_flags(p.self_case, p.ignore_index, a.label, a.forget, a.inst, a.index, sh.label[col],
                                   sh.forget[col], sh.inst[col], j0 + col);
      put_gradient(sh, a.row, col, logit_grad(sh.score[a.row][col], f, grad) * p.inv_tau);
    }
    __syncthreads();
    accumulate_gradient(sh, c, j0, p.N, p.D, du, i0, ld);
  }
}

// dc[own candidates] += (1/tau) sum over anchor tiles of dS^T @ u; tiles are [candidates, anchors]
template <typename T>
__global__ void __launch_bounds__(kThreads) backward_candidate_kernel(CudaProblem p, CudaAnchorStats stats,
                                                                      float* dc, int64_t ld) {
  __shared__ __align__(128) SharedTiles<T> sh;
  const OwnRow cand = own_row(p.N, p.c_label, p.self_case ? p.c_forget : nullptr, p.self_case ? p.c_inst : nullptr,
                              p.ignore_index);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const T* u = static_cast<const T*>(p.u);
  const T* c = static_cast<const T*>(p.c);
  for (int64_t i0 = 0; i0 < p.M; i0 += kTile) {
    stage_rows(sh, p.a_label, p.a_forget, p.a_inst, i0, p.M, p.ignore_index);
    for (int r = threadIdx.x; r < kTile; r += kThreads) sh.stats[r] = anchor_grad(p, stats, i0 + r);
    similarity_tile(sh, c, j0, p.N, u, i0, p.M, p.D, p.inv_tau);
    for (int k = 0; k < kTile / 2; ++k) {
      const int col = cand.col0 + k;
      const uint8_t f = pair_flags(p.self_case, p.ignore_index, sh.label[col], sh.forget[col], sh.inst[col],
                                   i0 + col, cand.label, cand.forget, cand.inst, cand.index);
      put_gradient(sh, cand.row, col, logit_grad(sh.score[cand.row][col], f, sh.stats[col]) * p.inv_tau);
    }
    __syncthreads();
    accumulate_gradient(sh, u, i0, p.M, p.D, dc, j0, ld);
  }
}

template <template <typename> class Kernel, typename... Args>
cudaError_t launch(const CudaProblem& p, int64_t own_rows, cudaStream_t stream, Args... args) {
  const dim3 grid(static_cast<unsigned>((own_rows + kTile - 1) / kTile));
  switch (p.type) {
    case ElementType::kFloat32: Kernel<float>::run(grid, stream, p, args...); break;
    case ElementType::kFloat16: Kernel<__half>::run(grid, stream, p, args...); break;
    case ElementType::kBFloat16: Kernel<__nv_bfloat16>::run(grid, stream, p, args...); break;
  }
  return cudaGetLastError();
}

template <typename T> struct Forward {
  static void run(dim3 grid, cudaStream_t stream, const CudaProblem& p, float* loss, float* lse_a, float* lse_p,
                  int32_t* count) {
    forward_kernel<T><<<grid, kThreads, 0, stream>>>(p, loss, lse_a, lse_p, count);
  }
};
template <typename T> struct BackwardAnchor {
  static void run(dim3 grid, cudaStream_t stream, const CudaProblem& p, CudaAnchorStats s, float* du) {
    backward_anchor_kernel<T><<<grid, kThreads, 0, stream>>>(p, s, du, cols_padded(p.D));
  }
};
template <typename T> struct BackwardCandidate {
  static void run(dim3 grid, cudaStream_t stream, const CudaProblem& p, CudaAnchorStats s, float* dc) {
    backward_candidate_kernel<T><<<grid, kThreads, 0, stream>>>(p, s, dc, cols_padded(p.D));
  }
};

}  // namespace

int64_t rows_padded(int64_t rows) { return (rows + kTile - 1) / kTile * kTile; }
int64_t cols_padded(int64_t cols) { return (cols + kTile - 1) / kTile * kTile; }

cudaError_t launch_forward(const CudaProblem& p, float* loss, float* lse_a, float* lse_p, int32_t* count,
                           cudaStream_t stream) {
  return launch<Forward>(p, p.M, stream, loss, lse_a, lse_p, count);
}

cudaError_t launch_backward_anchor(const CudaProblem& p, const CudaAnchorStats& stats, float* du_padded,
                                   cudaStream_t stream) {
  return launch<BackwardAnchor>(p, p.M, stream, stats, du_padded);
}

cudaError_t launch_backward_candidate(const CudaProblem& p, const CudaAnchorStats& stats, float* dc_padded,
                                      cudaStream_t stream) {
  return launch<BackwardCandidate>(p, p.N, stream, stats, dc_padded);
}

}  // namespace deepcut
