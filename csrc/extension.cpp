// Python module entry point of projects_dcnv2._C. Importing the module loads this library, whose
// static initialisers register the dcnv2 operators (schemas in ops/*.cpp, kernels in ops/cpu and
// ops/cuda) with the PyTorch dispatcher; Python then reaches them as torch.ops.dcnv2.*.
#include <Python.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

namespace dcnv2 {

// CUDA runtime version the extension was built with, or -1 for a CPU-only build.
int64_t cuda_version() {
#ifdef WITH_CUDA
  return CUDART_VERSION;
#else
  return -1;
#endif
}

TORCH_LIBRARY_FRAGMENT(dcnv2, m) { m.def("_cuda_version", &cuda_version); }

}  // namespace dcnv2

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "DCNv2 operators (see torch.ops.dcnv2)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
