// Shared by the op registration (realnet.cpp), the CPU kernels (cpu/realnet_cpu.cpp) and
// the CUDA kernels (cuda/realnet_cuda.cu): input checks and the bilinear geometry.
//
// The ops (schemas in realnet.cpp, semantics in realnet/ops.py and docs/method.md):
//   rrs_stats(feats[], recons[]) -> stats (3, B, M) float64: per sample and channel the
//       spatial max, mean and biased variance of E = upsample((feats - recons)^2)
//   rrs_rank(stats, spatial, k_max, k_mean, running_mean!, running_var!, training,
//       momentum, eps) -> indices (B, k_max + k_mean) int64
//   rrs_gather(feats[], recons[], indices) -> selected (B, K, H, W) = E[b, indices[b, j]]
//   rrs_gather_backward(grad, feats[], recons[], indices, need_feats, need_recons)
//       -> (grad_feats[], grad_recons[])
//   afs_channel_loss(anomalous, normal, mask) -> (C,) float32
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#if defined(__CUDACC__)
#define RN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RN_HOST_DEVICE inline
#endif

namespace realnet {

constexpr int kMaxLevels = 8;        // feature levels an RRS call may concatenate

// Which version of the CUDA kernels the ops run (csrc/cuda/v1.cu, v2.cu, ...). The default
// is the newest version that has passed the parity tests on a GPU; REALNET_CUDA_KERNELS=N
// at import, or realnet.ops.cuda_kernels(N), selects another (benchmarks, parity tests).
constexpr int kCudaKernelVersions = 2;
constexpr int kDefaultCudaKernels = 1;
int cuda_kernel_version();
void set_cuda_kernel_version(int version);
constexpr double kAfsEps = 1e-4;     // added to the min-max range in AFS (the authors' value)

// ---------------------------------------------------------------------------------------
// Bilinear upsampling with align_corners=True, computed exactly as PyTorch's
// upsample_bilinear2d does (same scale, same source index, same weights), so the fused
// kernels see the same upsampled values as F.interpolate.
// ---------------------------------------------------------------------------------------
template <typename acc_t>
RN_HOST_DEVICE acc_t align_corners_scale(int64_t in_size, int64_t out_size) {
  return out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1)
                      : static_cast<acc_t>(0);
}

// Output position `dst` reads input positions i0 and i1 with weights l0 and l1.
template <typename acc_t>
struct Tap {
  int64_t i0, i1;
  acc_t l0, l1;
};

template <typename acc_t>
RN_HOST_DEVICE Tap<acc_t> source_tap(int64_t dst, int64_t in_size, acc_t scale) {
  const acc_t real = scale * static_cast<acc_t>(dst);
  int64_t i0 = static_cast<int64_t>(real);
  i0 = i0 < 0 ? 0 : (i0 > in_size - 1 ? in_size - 1 : i0);
  acc_t l1 = real - static_cast<acc_t>(i0);
  l1 = l1 < acc_t(0) ? acc_t(0) : (l1 > acc_t(1) ? acc_t(1) : l1);
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  return {i0, i1, acc_t(1) - l1, l1};
}

// The adjoint, used by the backward: which outputs read source position i, and how much.
// Taps move forward monotonically with the output position, so the outputs that read i
// form one window [first, last]; both ends are found by binary search on that order.
struct Window {
  int64_t first, last;  // inclusive; empty when first > last
};

template <typename acc_t>
RN_HOST_DEVICE Window source_window(int64_t i, int64_t in_size, int64_t out_size, acc_t scale) {
  int64_t lo = 0, hi = out_size;  // first output whose second tap reaches i
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (source_tap<acc_t>(mid, in_size, scale).i1 >= i) hi = mid; else lo = mid + 1;
  }
  const int64_t first = lo;
  hi = out_size;  // first output whose first tap is past i
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (source_tap<acc_t>(mid, in_size, scale).i0 > i) hi = mid; else lo = mid + 1;
  }
  return {first, lo - 1};
}

// Weight with which output `dst` reads source `i` (both taps may be i at the border).
template <typename acc_t>
RN_HOST_DEVICE acc_t tap_weight(int64_t dst, int64_t i, int64_t in_size, acc_t scale) {
  const auto t = source_tap<acc_t>(dst, in_size, scale);
  return (t.i0 == i ? t.l0 : acc_t(0)) + (t.i1 == i ? t.l1 : acc_t(0));
}

// ---------------------------------------------------------------------------------------
// Input checks shared by both devices: one clear sentence per mistake.
// ---------------------------------------------------------------------------------------
struct LevelsInfo {
  int64_t batch = 0, height = 0, width = 0, channels = 0;
  std::vector<int64_t> channel_offset;  // channel_offset[l] = first concatenated channel of level l
};

inline void check_floating(const at::Tensor& t, const char* name, bool allow_reduced) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble ||
                  (allow_reduced && (dt == at::kHalf || dt == at::kBFloat16));
  TORCH_CHECK(ok, name, " must be float32 or float64",
              allow_reduced ? " (or float16/bfloat16 on CUDA)" : " on the CPU (float16/bfloat16 are CUDA-only)",
              ", got ", dt);
}

inline LevelsInfo check_levels(const char* op, at::TensorList feats, at::TensorList recons) {
  TORCH_CHECK(!feats.empty(), op, ": feats is an empty list; give at least one feature level");
  TORCH_CHECK(feats.size() == recons.size(), op, ": feats has ", feats.size(),
              " levels but recons has ", recons.size());
  TORCH_CHECK(static_cast<int64_t>(feats.size()) <= kMaxLevels, op, ": at most ", kMaxLevels,
              " levels are supported, got ", feats.size());
  LevelsInfo info;
  const auto& first = feats[0];
  const bool cuda = first.is_cuda();
  for (size_t l = 0; l < feats.size(); ++l) {
    const auto& f = feats[l];
    const auto& r = recons[l];
    TORCH_CHECK(f.dim() == 4, op, ": feats[", l, "] must be 4-D (B, C, H, W), got ", f.dim(), "-D");
    TORCH_CHECK(r.dim() == 4, op, ": recons[", l, "] must be 4-D (B, C, H, W), got ", r.dim(), "-D");
    TORCH_CHECK(f.sizes() == r.sizes(), op, ": feats[", l, "] has shape ", f.sizes(),
                " but recons[", l, "] has shape ", r.sizes());
    TORCH_CHECK(f.device() == first.device() && r.device() == first.device(), op,
                ": all feats and recons must be on one device; level ", l, " has feats on ",
                f.device(), " and recons on ", r.device(), ", level 0 on ", first.device());
    TORCH_CHECK(f.scalar_type() == first.scalar_type() && r.scalar_type() == first.scalar_type(), op,
                ": all feats and recons must have one dtype; level ", l, " has ", f.scalar_type(),
                "/", r.scalar_type(), ", level 0 has ", first.scalar_type());
    TORCH_CHECK(f.size(0) == first.size(0), op, ": level ", l, " has batch ", f.size(0),
                ", level 0 has batch ", first.size(0));
    TORCH_CHECK(f.size(1) > 0 && f.size(2) > 0 && f.size(3) > 0, op, ": level ", l,
                " is empty (shape ", f.sizes(), ")");
    TORCH_CHECK(f.size(2) <= first.size(2) && f.size(3) <= first.size(3), op, ": level ", l, " (",
                f.size(2), "x", f.size(3), ") is larger than level 0 (", first.size(2), "x",
                first.size(3), "); order the levels finest first");
    info.channel_offset.push_back(info.channels);
    info.channels += f.size(1);
  }
  check_floating(first, "feats", cuda);
  TORCH_CHECK(first.size(0) > 0, op, ": the batch is empty (B = 0)");
  info.channel_offset.push_back(info.channels);
  info.batch = first.size(0);
  info.height = first.size(2);
  info.width = first.size(3);
  return info;
}

inline void check_rank_args(const at::Tensor& stats, int64_t spatial, int64_t k_max, int64_t k_mean,
                            const at::Tensor& running_mean, const at::Tensor& running_var,
                            bool training) {
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == 3, "rrs_rank: stats must be (3, B, M) as rrs_stats returns, got ",
              stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kDouble, "rrs_rank: stats must be float64, got ", stats.scalar_type());
  const int64_t batch = stats.size(1), channels = stats.size(2);
  TORCH_CHECK(batch > 0, "rrs_rank: the batch is empty (B = 0)");
  TORCH_CHECK(k_max >= 0 && k_mean >= 0 && k_max + k_mean > 0,
              "rrs_rank: k_max and k_mean must be >= 0 and not both 0, got k_max=", k_max, ", k_mean=", k_mean);
  TORCH_CHECK(k_max <= channels, "rrs_rank: k_max=", k_max, " is larger than the channel count M=", channels);
  TORCH_CHECK(k_mean <= channels, "rrs_rank: k_mean=", k_mean, " is larger than the channel count M=", channels);
  for (const auto* t : {&running_mean, &running_var}) {
    const char* name = t == &running_mean ? "running_mean" : "running_var";
    TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, "rrs_rank: ", name, " must have shape (M,) = (",
                channels, ",), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, "rrs_rank: ", name,
                " must be float32 or float64, got ", t->scalar_type());
    TORCH_CHECK(t->device() == stats.device(), "rrs_rank: ", name, " is on ", t->device(),
                " but the features are on ", stats.device());
    TORCH_CHECK(t->is_contiguous(), "rrs_rank: ", name, " must be contiguous (it is updated in place)");
  }
  TORCH_CHECK(!training || batch * spatial > 1,
              "rrs_rank: training needs more than one value per channel for batch statistics, got B*H*W=",
              batch * spatial);
}

inline void check_indices(const char* op, const at::Tensor& indices, const LevelsInfo& info,
                          const at::Tensor& feat0) {
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == info.batch, op,
              ": indices must be (B, K) with B=", info.batch, ", got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == feat0.device(), op, ": indices are on ", indices.device(),
              " but the features are on ", feat0.device());
}

inline void check_afs(const at::Tensor& anomalous, const at::Tensor& normal, const at::Tensor& mask) {
  TORCH_CHECK(anomalous.dim() == 4, "afs_channel_loss: anomalous must be 4-D (B, C, h, w), got ",
              anomalous.dim(), "-D");
  TORCH_CHECK(normal.sizes() == anomalous.sizes(), "afs_channel_loss: normal has shape ", normal.sizes(),
              " but anomalous has shape ", anomalous.sizes());
  TORCH_CHECK(normal.scalar_type() == anomalous.scalar_type(), "afs_channel_loss: normal is ",
              normal.scalar_type(), " but anomalous is ", anomalous.scalar_type());
  TORCH_CHECK(mask.dim() == 4 && mask.size(1) == 1 && mask.size(0) == anomalous.size(0),
              "afs_channel_loss: mask must be (B, 1, H, W) with B=", anomalous.size(0), ", got ", mask.sizes());
  TORCH_CHECK(anomalous.size(0) > 0, "afs_channel_loss: the batch is empty (B = 0)");
  TORCH_CHECK(anomalous.size(1) > 0 && anomalous.size(2) > 0 && anomalous.size(3) > 0 && mask.size(2) > 0 &&
                  mask.size(3) > 0,
              "afs_channel_loss: empty feature map or mask (anomalous ", anomalous.sizes(), ", mask ",
              mask.sizes(), ")");
  TORCH_CHECK(normal.device() == anomalous.device() && mask.device() == anomalous.device(),
              "afs_channel_loss: anomalous, normal and mask must be on one device, got ", anomalous.device(),
              ", ", normal.device(), ", ", mask.device());
  check_floating(anomalous, "anomalous", anomalous.is_cuda());
}

// Index of the nearest-neighbour source pixel, as F.interpolate(mode="nearest") computes it.
RN_HOST_DEVICE int64_t nearest_source(int64_t dst, int64_t in_size, int64_t out_size) {
  if (in_size == out_size) return dst;
  if (out_size == 2 * in_size) return dst >> 1;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return src < in_size - 1 ? src : in_size - 1;
}

}  // namespace realnet
