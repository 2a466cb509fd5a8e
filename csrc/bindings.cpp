// Python module deepcut_fast._C: the compiled kernels. Import torch before importing it.
#include <torch/extension.h>

#include "cpu/contrastive_cpu.h"
#ifdef DEEPCUT_WITH_CUDA
#include "cuda/contrastive_cuda.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deepcut_fast compiled kernels (C++/OpenMP CPU, and CUDA when built with it)";
  m.def("cpu_forward", &deepcut::contrastive_forward_cpu, "fused contrastive forward (CPU)");
  m.def("cpu_backward", &deepcut::contrastive_backward_cpu, "fused contrastive backward (CPU)");
#ifdef DEEPCUT_WITH_CUDA
  m.def("cuda_forward", &deepcut::contrastive_forward_cuda, "fused contrastive forward (CUDA)");
  m.def("cuda_backward", &deepcut::contrastive_backward_cuda, "fused contrastive backward (CUDA)");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
