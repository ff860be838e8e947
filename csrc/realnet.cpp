// Operator registration: the schemas of torch.ops.realnet.*. The kernels are registered
// per device in cpu/realnet_cpu.cpp and cuda/realnet_cuda.cu; the Python side
// (realnet/ops.py) adds the fake (meta) kernels and the autograd formula.
#include <Python.h>

#include "realnet.h"

extern "C" {
// Importing realnet._C only has to load this library so that the static registrations
// below run; the module itself is empty (as in pytorch/extension-cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
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
