// Registers the noprop_cuda operator library: schemas (argument order as noprop/ops/eager.py) and
// the CUDA kernels. Fake (shape) kernels are registered from Python in noprop/kernels/cuda/__init__.py.
// Built as a Python extension module (setup.py, JIT) it also exposes its build's torch and CUDA
// versions so the loader can explain a mismatch; built by CMake it is a plain shared library.
#include <torch/library.h>
#include <torch/version.h>

#include <cuda_runtime_api.h>  // CUDART_VERSION of the toolkit this was compiled with

#include "ops.h"

TORCH_LIBRARY(noprop_cuda, m) {
  m.def("noise_inject(Tensor W, Tensor y, Tensor sqrt_abar, Tensor sqrt_one_minus_abar, Tensor seed) -> Tensor");
  m.def(
      "noise_inject_backward(Tensor grad_z, Tensor W, Tensor y, Tensor sqrt_abar, Tensor sqrt_one_minus_abar, "
      "Tensor seed) -> (Tensor, Tensor, Tensor)");
  m.def("local_loss(Tensor logits, Tensor W, Tensor y, Tensor weight, Tensor? offset=None, bool softmax=True) -> Tensor");
  m.def(
      "local_loss_backward(Tensor grad_loss, Tensor logits, Tensor W, Tensor y, Tensor weight, Tensor? offset=None, "
      "bool softmax=True) -> (Tensor, Tensor, Tensor)");
  m.def(
      "denoise_step(Tensor logits, Tensor W, Tensor z_prev, float a, float b, float sqrt_c, Tensor seed, "
      "bool softmax=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(noprop_cuda, CUDA, m) {
  m.impl("noise_inject", &noprop_cuda::noise_inject);
  m.impl("noise_inject_backward", &noprop_cuda::noise_inject_backward);
  m.impl("local_loss", &noprop_cuda::local_loss);
  m.impl("local_loss_backward", &noprop_cuda::local_loss_backward);
  m.impl("denoise_step", &noprop_cuda::denoise_step);
}

#if defined(NOPROP_PYTHON_MODULE) && defined(TORCH_EXTENSION_NAME)
// Only the limited C API (setup.py builds with Py_LIMITED_API, so one binary serves every CPython).
#include <Python.h>

#define NOPROP_CONCAT_(a, b) a##b
#define NOPROP_CONCAT(a, b) NOPROP_CONCAT_(a, b)
#define NOPROP_STR_(x) #x
#define NOPROP_STR(x) NOPROP_STR_(x)

extern "C" PyObject* NOPROP_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, NOPROP_STR(TORCH_EXTENSION_NAME),
                            "noprop_cuda operator library (registered in torch.ops.noprop_cuda on import)",
                            -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
  const char* torch_version =
      NOPROP_STR(TORCH_VERSION_MAJOR) "." NOPROP_STR(TORCH_VERSION_MINOR) "." NOPROP_STR(TORCH_VERSION_PATCH);
  if (PyModule_AddStringConstant(mod, "torch_version", torch_version) < 0 ||
      PyModule_AddIntConstant(mod, "cuda_version", CUDART_VERSION) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
#endif
