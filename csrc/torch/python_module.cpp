// The Python module livethinking._C: build facts only (non-op glue). The ops
// themselves are TORCH_LIBRARY registrations that loading this library runs.
#include <pybind11/pybind11.h>

#ifndef LIVETHINKING_TORCH_VERSION
#define LIVETHINKING_TORCH_VERSION "unknown"
#endif
#ifndef LIVETHINKING_CUDA_ARCHS
#define LIVETHINKING_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "livethinking compiled ops (registered as torch.ops.livethinking.*) and build facts";
  m.attr("torch_version") = LIVETHINKING_TORCH_VERSION;
#if defined(LIVETHINKING_WITH_CUDA)
  m.attr("cuda_compiled") = true;
  m.attr("cuda_archs") = LIVETHINKING_CUDA_ARCHS;
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_archs") = "";
#endif
}
