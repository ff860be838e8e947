// The versions of the CUDA kernels, side by side (as llm.c's dev/cuda keeps them): each
// version's file says in its header what it changes and whether it has run on a GPU.
// realnet_cuda.cu registers one dispatcher per op that calls the selected version.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#define REALNET_DECLARE_CUDA_VERSION(NS)                                                                        \
  namespace NS {                                                                                               \
  at::Tensor rrs_stats(at::TensorList feats, at::TensorList recons);                                           \
  at::Tensor rrs_rank(const at::Tensor& stats, int64_t spatial, int64_t k_max, int64_t k_mean,                 \
                      at::Tensor& running_mean, at::Tensor& running_var, bool training, double momentum,       \
                      double eps);                                                                             \
  at::Tensor rrs_gather(at::TensorList feats, at::TensorList recons, const at::Tensor& indices);               \
  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> rrs_gather_backward(                            \
      const at::Tensor& grad, at::TensorList feats, at::TensorList recons, const at::Tensor& indices,          \
      bool need_feats, bool need_recons);                                                                      \
  at::Tensor afs_channel_loss(const at::Tensor& anomalous, const at::Tensor& normal, const at::Tensor& mask);  \
  }

namespace realnet {
REALNET_DECLARE_CUDA_VERSION(v1)
REALNET_DECLARE_CUDA_VERSION(v2)
}  // namespace realnet
