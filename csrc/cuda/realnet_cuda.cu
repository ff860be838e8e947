// The CUDA registrations of the realnet ops. Each op calls the version of the kernels that
// is selected (realnet.cpp: REALNET_CUDA_KERNELS at import, or realnet.ops.cuda_kernels()).
// The versions live side by side in v1.cu, v2.cu, ...; each file's header says what it
// changes and whether it has run on a GPU.
#include <torch/library.h>

#include "../realnet.h"
#include "versions.h"

namespace realnet {
namespace {

#define REALNET_DISPATCH_VERSION(CALL)      \
  switch (cuda_kernel_version()) {          \
    case 1: return v1::CALL;                \
    default: return v2::CALL;               \
  }

at::Tensor rrs_stats_cuda(at::TensorList feats, at::TensorList recons) {
  REALNET_DISPATCH_VERSION(rrs_stats(feats, recons))
}

at::Tensor rrs_rank_cuda(const at::Tensor& stats, int64_t spatial, int64_t k_max, int64_t k_mean,
                         at::Tensor& running_mean, at::Tensor& running_var, bool training, double momentum,
                         double eps) {
  REALNET_DISPATCH_VERSION(rrs_rank(stats, spatial, k_max, k_mean, running_mean, running_var, training, momentum, eps))
}

at::Tensor rrs_gather_cuda(at::TensorList feats, at::TensorList recons, const at::Tensor& indices) {
  REALNET_DISPATCH_VERSION(rrs_gather(feats, recons, indices))
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> rrs_gather_backward_cuda(
    const at::Tensor& grad, at::TensorList feats, at::TensorList recons, const at::Tensor& indices, bool need_feats,
    bool need_recons) {
  REALNET_DISPATCH_VERSION(rrs_gather_backward(grad, feats, recons, indices, need_feats, need_recons))
}

at::Tensor afs_channel_loss_cuda(const at::Tensor& anomalous, const at::Tensor& normal, const at::Tensor& mask) {
  REALNET_DISPATCH_VERSION(afs_channel_loss(anomalous, normal, mask))
}

}  // namespace

TORCH_LIBRARY_IMPL(realnet, CUDA, m) {
  m.impl("rrs_stats", &rrs_stats_cuda);
  m.impl("rrs_rank", &rrs_rank_cuda);
  m.impl("rrs_gather", &rrs_gather_cuda);
  m.impl("rrs_gather_backward", &rrs_gather_backward_cuda);
  m.impl("afs_channel_loss", &afs_channel_loss_cuda);
}

}  // namespace realnet
