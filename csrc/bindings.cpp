// Python module deepcut_fast._C: the compiled kernels. Import torch before importing it.
#include <torch/extension.h>

#include "cpu/contrastive_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deepcut_fast compiled kernel (C++/OpenMP, CPU)";
  m.def("cpu_forward", &deepcut::contrastive_forward_cpu, "fused contrastive forward (CPU)");
  m.def("cpu_backward", &deepcut::contrastive_backward_cpu, "fused contrastive backward (CPU)");
}
