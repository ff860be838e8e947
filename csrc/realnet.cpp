// Operator registration: the schemas of torch.ops.realnet.*. The kernels are registered
// per device in cpu/realnet_cpu.cpp and cuda/realnet_cuda.cu; the Python side
// (realnet/ops.py) adds the fake (meta) kernels and the autograd formula.
#include <Python.h>

#include <atomic>
#include <cstdlib>

#include "realnet.h"

namespace realnet {
namespace {
int initial_cuda_kernels() {
  const char* chosen = std::getenv("REALNET_CUDA_KERNELS");
  const int version = chosen ? std::atoi(chosen) : kDefaultCudaKernels;
  return version >= 1 && version <= kCudaKernelVersions ? version : kDefaultCudaKernels;
}
std::atomic<int> g_cuda_kernels{initial_cuda_kernels()};
}  // namespace
int cuda_kernel_version() { return g_cuda_kernels.load(std::memory_order_relaxed); }
void set_cuda_kernel_version(int version) { g_cuda_kernels.store(version, std::memory_order_relaxed); }
}  // namespace realnet

extern "C" {
// _C.cuda_kernels() -> the version in use; _C.cuda_kernels(n) selects version n and
// returns the one it replaces. Wrapped by realnet.ops.cuda_kernels.
static PyObject* cuda_kernels(PyObject*, PyObject* args) {
  int version = 0;
  if (!PyArg_ParseTuple(args, "|i", &version)) return nullptr;
  const int previous = realnet::cuda_kernel_version();
  if (version != 0) {
    if (version < 1 || version > realnet::kCudaKernelVersions) {
      PyErr_Format(PyExc_ValueError, "cuda_kernels: version must be 1..%d, got %d", realnet::kCudaKernelVersions,
                   version);
      return nullptr;
    }
    realnet::set_cuda_kernel_version(version);
  }
  return PyLong_FromLong(previous);
}

static PyMethodDef methods[] = {
    {"cuda_kernels", cuda_kernels, METH_VARARGS, "Get (no argument) or set the version of the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

// Importing realnet._C loads this library, so that the static registrations below run
// (as in pytorch/extension-cpp); the module only adds cuda_kernels().
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(realnet, m) {
  // One pass over every level: per-sample spatial max / mean / variance of the upsampled
  // squared residual, float64 (3, B, M). Not differentiable (used only to rank).
  m.def("rrs_stats(Tensor[] feats, Tensor[] recons) -> Tensor");
  // BatchNorm statistics from rrs_stats, running-stat update (in place, as F.batch_norm
  // does in training), then per-sample top-k by normalised max and by normalised mean.
  m.def(
      "rrs_rank(Tensor stats, int spatial, int k_max, int k_mean, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, bool training, float momentum, float eps) -> Tensor");
  // selected[b, j] = upsample((feats - recons)^2)[b, indices[b, j]], straight from the inputs.
  m.def("rrs_gather(Tensor[] feats, Tensor[] recons, Tensor indices) -> Tensor");
  // Gradient of rrs_gather: scatter (duplicates summed) through the upsampling and the square.
  m.def(
      "rrs_gather_backward(Tensor grad, Tensor[] feats, Tensor[] recons, Tensor indices, "
      "bool need_feats, bool need_recons) -> (Tensor[], Tensor[])");
  // AFS (paper eq. 4) for one batch: per-channel loss (C,), float32.
  m.def("afs_channel_loss(Tensor anomalous, Tensor normal, Tensor mask) -> Tensor");
}
