// CUDA kernels, version 1: the first CUDA kernels of this project, kept as they were.
// Run on a GPU: yes (H100 80GB HBM3, torch 2.11+cu130, 2026-11-23: parity with the reference
// in float32/float16/bfloat16, opcheck, gradcheck; timings in benchmarks/RESULTS.md).
// float32/float64, and float16/bfloat16 inputs with float32 accumulation; the same
// arithmetic as the CPU kernels (csrc/cpu/realnet_cpu.cpp):
//   rrs_stats           one block per (sample, channel): max / mean / variance of the
//                       upsampled residual, computed on the fly from feats and recons
//   rrs_rank            one thread per channel for the batch statistics, then one block
//                       per (sample, mode) that ranks channels by counting (stable, exact)
//   rrs_gather          one block per output plane, residual recomputed on the fly
//   rrs_gather_backward one block per (sample, channel): the adjoint of the upsampling
//                       gathered over each source pixel's window (no atomics: deterministic)
//   afs_channel_loss    one block per channel, min/max pass then loss pass
// Where it loses time (torch profiler on an H100, paper shapes, batch 16): the backward's
// window loops re-read the upstream gradient from L2 (0.93 ms), the statistics do int64
// index arithmetic and float64 block reductions per pixel (0.68 ms), the ranking does
// O(M^2) float64 comparisons in 2B blocks (0.51 ms). Version 2 (v2.cu) rewrites those.
#include "common.cuh"
#include "versions.h"

namespace realnet {
namespace v1 {
namespace {
// ---------------------------------------------------------------------------------------
// rrs_stats
// ---------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void rrs_stats_kernel(Levels<scalar_t> L, int64_t B, int64_t M, double* stats) {
  using acc_t = acc_type<scalar_t>;
  __shared__ double shared_d[32];
  __shared__ acc_t shared_a[32];
  const int64_t task = blockIdx.x, b = task / M, channel = task % M;
  const int l = locate(L, channel);
  const int64_t base = (b * L.channels[l] + channel - L.offset[l]) * L.h[l] * L.w[l];
  const int64_t HW = L.H * L.W;
  // sums shifted by the first value: a stable variance in one pass
  const acc_t shift = upsampled<scalar_t, acc_t>(L, l, base, 0, 0);
  acc_t peak = -std::numeric_limits<acc_t>::infinity(), s1 = 0, s2 = 0;
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
    const acc_t v = upsampled<scalar_t, acc_t>(L, l, base, p / L.W, p % L.W);
    peak = v > peak ? v : peak;
    const acc_t d = v - shift;
    s1 += d;
    s2 += d * d;
  }
  peak = block_reduce(peak, Max(), -std::numeric_limits<acc_t>::infinity(), shared_a);
  const double sum1 = block_reduce(static_cast<double>(s1), Sum(), 0.0, shared_d);
  const double sum2 = block_reduce(static_cast<double>(s2), Sum(), 0.0, shared_d);
  if (threadIdx.x == 0) {
    const double m1 = sum1 / HW;
    double var = sum2 / HW - m1 * m1;
    var = var < 0 ? 0 : var;
    stats[b * M + channel] = isnan(sum1) ? sum1 : static_cast<double>(peak);
    stats[B * M + b * M + channel] = static_cast<double>(shift) + m1;
    stats[2 * B * M + b * M + channel] = var;
  }
}

at::Tensor rrs_stats_cuda(at::TensorList feats_in, at::TensorList recons_in) {
  const auto info = check_levels("rrs_stats", feats_in, recons_in);
  const c10::cuda::CUDAGuard guard(feats_in[0].device());
  const auto feats = contiguous_all(feats_in), recons = contiguous_all(recons_in);
  const int64_t B = info.batch, M = info.channels;
  auto stats = at::empty({3, B, M}, feats[0].options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "rrs_stats_cuda", [&] {
    const auto L = make_levels<scalar_t>(feats, recons, info);
    rrs_stats_kernel<scalar_t><<<B * M, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(L, B, M,
                                                                                          stats.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return stats;
}

// ---------------------------------------------------------------------------------------
// rrs_rank
// ---------------------------------------------------------------------------------------
template <typename stat_t>
__global__ void channel_norm_kernel(const double* stats, int64_t B, int64_t M, int64_t spatial, stat_t* run_mean,
                                    stat_t* run_var, bool training, double momentum, double eps, double* norm) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= M) return;
  const double* mean = stats + B * M;
  const double* var = stats + 2 * B * M;
  double mu, sigma2;
  if (training) {
    mu = 0;
    for (int64_t b = 0; b < B; ++b) mu += mean[b * M + c];
    mu /= B;
    sigma2 = 0;
    for (int64_t b = 0; b < B; ++b) {
      const double d = mean[b * M + c] - mu;
      sigma2 += var[b * M + c] + d * d;
    }
    sigma2 /= B;
    const double count = static_cast<double>(B) * spatial;
    run_mean[c] = static_cast<stat_t>(momentum * mu + (1.0 - momentum) * static_cast<double>(run_mean[c]));
    run_var[c] = static_cast<stat_t>(momentum * sigma2 * count / (count - 1.0) +
                                     (1.0 - momentum) * static_cast<double>(run_var[c]));
  } else {
    mu = static_cast<double>(run_mean[c]);
    sigma2 = static_cast<double>(run_var[c]);
  }
  norm[c] = mu;
  norm[M + c] = 1.0 / sqrt(sigma2 + eps);
}

// Does channel (sa, a) come before (sb, b)? Descending, NaN first, ties to the lower index.
__device__ __forceinline__ bool precedes(double sa, int64_t a, double sb, int64_t b) {
  const bool na = isnan(sa), nb = isnan(sb);
  if (na != nb) return na;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

constexpr int kRankTile = 1024;

// Block (b, mode): the rank of channel c is the number of channels that precede it.
__global__ void rank_kernel(const double* stats, const double* norm, int64_t B, int64_t M, int64_t k_max,
                            int64_t k_mean, int64_t* indices) {
  __shared__ double tile[kRankTile];
  const int64_t b = blockIdx.x, mode = blockIdx.y;
  const int64_t k = mode == 0 ? k_max : k_mean, offset = mode == 0 ? 0 : k_max, K = k_max + k_mean;
  if (k == 0) return;
  const double* stat = stats + mode * B * M + b * M;  // stats[0] = max, stats[1] = mean
  auto score = [&](int64_t c) { return (stat[c] - norm[c]) * norm[M + c]; };
  for (int64_t own = 0; own < M; own += blockDim.x) {
    const int64_t c = own + threadIdx.x;
    const double mine = c < M ? score(c) : 0.0;
    int64_t rank = 0;
    for (int64_t start = 0; start < M; start += kRankTile) {
      const int64_t n = M - start < kRankTile ? M - start : kRankTile;
      __syncthreads();
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) tile[j] = score(start + j);
      __syncthreads();
      if (c < M)
        for (int64_t j = 0; j < n; ++j) rank += precedes(tile[j], start + j, mine, c);
    }
    if (c < M && rank < k) indices[b * K + offset + rank] = c;
  }
}

at::Tensor rrs_rank_cuda(const at::Tensor& stats_in, int64_t spatial, int64_t k_max, int64_t k_mean,
                         at::Tensor& running_mean, at::Tensor& running_var, bool training, double momentum,
                         double eps) {
  check_rank_args(stats_in, spatial, k_max, k_mean, running_mean, running_var, training);
  const c10::cuda::CUDAGuard guard(stats_in.device());
  const auto stats = stats_in.contiguous();
  const int64_t B = stats.size(1), M = stats.size(2);
  auto norm = at::empty({2, M}, stats.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "rrs_rank_cuda", [&] {
    channel_norm_kernel<scalar_t><<<(M + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        stats.data_ptr<double>(), B, M, spatial, running_mean.data_ptr<scalar_t>(),
        running_var.data_ptr<scalar_t>(), training, momentum, eps, norm.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto indices = at::empty({B, k_max + k_mean}, stats.options().dtype(at::kLong));
  rank_kernel<<<dim3(B, 2), kThreads, 0, stream>>>(stats.data_ptr<double>(), norm.data_ptr<double>(), B, M, k_max,
                                                    k_mean, indices.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return indices;
}

// ---------------------------------------------------------------------------------------
// rrs_gather and its backward
// ---------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void gather_kernel(Levels<scalar_t> L, const int64_t* indices, int64_t K, int64_t M, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t task = blockIdx.x, b = task / K, channel = indices[task];
  CUDA_KERNEL_ASSERT(channel >= 0 && channel < M);
  const int l = locate(L, channel);
  const int64_t base = (b * L.channels[l] + channel - L.offset[l]) * L.h[l] * L.w[l];
  const int64_t HW = L.H * L.W;
  scalar_t* plane = out + task * HW;
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x)
    plane[p] = static_cast<scalar_t>(upsampled<scalar_t, acc_t>(L, l, base, p / L.W, p % L.W));
}

at::Tensor rrs_gather_cuda(at::TensorList feats_in, at::TensorList recons_in, const at::Tensor& indices_in) {
  const auto info = check_levels("rrs_gather", feats_in, recons_in);
  check_indices("rrs_gather", indices_in, info, feats_in[0]);
  const c10::cuda::CUDAGuard guard(feats_in[0].device());
  const auto feats = contiguous_all(feats_in), recons = contiguous_all(recons_in);
  const auto indices = indices_in.contiguous();
  const int64_t B = info.batch, K = indices.size(1);
  auto selected = at::empty({B, K, info.height, info.width}, feats[0].options());
  if (B * K == 0) return selected;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "rrs_gather_cuda", [&] {
    const auto L = make_levels<scalar_t>(feats, recons, info);
    gather_kernel<scalar_t><<<B * K, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        L, indices.data_ptr<int64_t>(), K, info.channels, selected.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return selected;
}

// Where the per-level gradients go (nullptr: not needed), passed by value.
template <typename scalar_t>
struct GradOut {
  scalar_t* feats[kMaxLevels];
  scalar_t* recons[kMaxLevels];
};

template <typename scalar_t>
__global__ void gather_backward_kernel(Levels<scalar_t> L, const scalar_t* grad, const int64_t* start,
                                       const int64_t* picks, int64_t K, int64_t M, GradOut<scalar_t> out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t task = blockIdx.x, b = task / M, channel = task % M;
  const int l = locate(L, channel);
  const int64_t h = L.h[l], w = L.w[l], n = h * w, H = L.H, W = L.W;
  const int64_t base = (b * L.channels[l] + channel - L.offset[l]) * n;
  scalar_t* gf = out.feats[l] ? out.feats[l] + base : nullptr;
  scalar_t* gr = out.recons[l] ? out.recons[l] + base : nullptr;
  const int64_t first_pick = start[task], end_pick = start[task + 1];
  const acc_t scale_h = align_corners_scale<acc_t>(h, H), scale_w = align_corners_scale<acc_t>(w, W);
  const bool identity = h == H && w == W;
  for (int64_t q = threadIdx.x; q < n; q += blockDim.x) {
    acc_t g = 0;
    if (first_pick < end_pick) {
      const int64_t i = q / w, j = q % w;
      const auto rows = identity ? Window{i, i} : source_window<acc_t>(i, h, H, scale_h);
      const auto cols = identity ? Window{j, j} : source_window<acc_t>(j, w, W, scale_w);
      for (int64_t y = rows.first; y <= rows.last; ++y) {
        const acc_t wy = identity ? acc_t(1) : tap_weight<acc_t>(y, i, h, scale_h);
        for (int64_t x = cols.first; x <= cols.last; ++x) {
          const acc_t wx = identity ? acc_t(1) : tap_weight<acc_t>(x, j, w, scale_w);
          acc_t sum = 0;  // duplicated picks of this channel, in ascending order of j
          for (int64_t p = first_pick; p < end_pick; ++p)
            sum += static_cast<acc_t>(grad[((b * K + picks[p]) * H + y) * W + x]);
          g += wy * (wx * sum);
        }
      }
      const acc_t d = static_cast<acc_t>(L.feat[l][base + q]) - static_cast<acc_t>(L.recon[l][base + q]);
      g = acc_t(2) * d * g;
    }
    if (gf) gf[q] = static_cast<scalar_t>(g);
    if (gr) gr[q] = static_cast<scalar_t>(-g);
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> rrs_gather_backward_cuda(
    const at::Tensor& grad_in, at::TensorList feats_in, at::TensorList recons_in, const at::Tensor& indices_in,
    bool need_feats, bool need_recons) {
  const auto info = check_levels("rrs_gather_backward", feats_in, recons_in);
  check_indices("rrs_gather_backward", indices_in, info, feats_in[0]);
  const int64_t B = info.batch, M = info.channels, K = indices_in.size(1), H = info.height, W = info.width;
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == B && grad_in.size(1) == K && grad_in.size(2) == H &&
                  grad_in.size(3) == W,
              "rrs_gather_backward: grad must be (B, K, H, W) = (", B, ", ", K, ", ", H, ", ", W, "), got ",
              grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == feats_in[0].scalar_type(), "rrs_gather_backward: grad is ",
              grad_in.scalar_type(), " but the features are ", feats_in[0].scalar_type());
  TORCH_CHECK(grad_in.device() == feats_in[0].device(), "rrs_gather_backward: grad is on ", grad_in.device(),
              " but the features are on ", feats_in[0].device());
  const c10::cuda::CUDAGuard guard(feats_in[0].device());
  const auto feats = contiguous_all(feats_in), recons = contiguous_all(recons_in);
  const auto grad = grad_in.contiguous();
  // For each (sample, channel), the output planes j that picked it, in ascending j: a
  // stable sort of the keys b * M + index gives a deterministic order of summation.
  const auto keys = (at::arange(B, indices_in.options()).unsqueeze(1) * M + indices_in).reshape({-1});
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto picks = (std::get<1>(sorted) % K).contiguous();
  const auto start = at::searchsorted(std::get<0>(sorted), at::arange(B * M + 1, indices_in.options())).contiguous();

  std::vector<at::Tensor> grad_feats, grad_recons;
  for (size_t l = 0; l < feats.size(); ++l) {
    if (need_feats) grad_feats.push_back(at::empty_like(feats[l]));
    if (need_recons) grad_recons.push_back(at::empty_like(recons[l]));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "rrs_gather_backward_cuda", [&] {
    const auto L = make_levels<scalar_t>(feats, recons, info);
    GradOut<scalar_t> out{};
    for (size_t l = 0; l < feats.size(); ++l) {
      out.feats[l] = need_feats ? grad_feats[l].data_ptr<scalar_t>() : nullptr;
      out.recons[l] = need_recons ? grad_recons[l].data_ptr<scalar_t>() : nullptr;
    }
    gather_backward_kernel<scalar_t><<<B * M, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        L, grad.data_ptr<scalar_t>(), start.data_ptr<int64_t>(), picks.data_ptr<int64_t>(), K, M, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_feats, grad_recons};
}

// ---------------------------------------------------------------------------------------
// afs_channel_loss
// ---------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void afs_kernel(const scalar_t* anomalous, const scalar_t* normal, const float* mask, int64_t B,
                           int64_t C, int64_t h, int64_t w, int64_t MH, int64_t MW, float* loss) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t shared_a[32];
  __shared__ double shared_d[32];
  const int64_t c = blockIdx.x, hw = h * w, n = B * hw;
  auto squared_difference = [&](int64_t e) {
    const int64_t b = e / hw, p = e % hw, index = (b * C + c) * hw + p;
    const acc_t d = static_cast<acc_t>(anomalous[index]) - static_cast<acc_t>(normal[index]);
    return d * d;
  };
  acc_t low = std::numeric_limits<acc_t>::infinity(), high = -low;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const acc_t d = squared_difference(e);
    low = d < low ? d : low;
    high = d > high ? d : high;
  }
  low = block_reduce(low, Min(), std::numeric_limits<acc_t>::infinity(), shared_a);
  high = block_reduce(high, Max(), -std::numeric_limits<acc_t>::infinity(), shared_a);
  const acc_t range = high - low + static_cast<acc_t>(kAfsEps);
  acc_t partial = 0;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {  // second read: the channel is in L2 now
    const int64_t b = e / hw, p = e % hw;
    const float label = mask[(b * MH + nearest_source(p / w, MH, h)) * MW + nearest_source(p % w, MW, w)];
    const acc_t err = (squared_difference(e) - low) / range - static_cast<acc_t>(label);
    partial += err * err;
  }
  const double total = block_reduce(static_cast<double>(partial), Sum(), 0.0, shared_d);
  if (threadIdx.x == 0) loss[c] = static_cast<float>(total / n);
}

at::Tensor afs_channel_loss_cuda(const at::Tensor& anomalous_in, const at::Tensor& normal_in,
                                 const at::Tensor& mask_in) {
  check_afs(anomalous_in, normal_in, mask_in);
  const c10::cuda::CUDAGuard guard(anomalous_in.device());
  const auto anomalous = anomalous_in.contiguous(), normal = normal_in.contiguous();
  const auto mask = mask_in.to(at::kFloat).contiguous();
  const int64_t B = anomalous.size(0), C = anomalous.size(1), h = anomalous.size(2), w = anomalous.size(3);
  auto loss = at::empty({C}, anomalous.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anomalous.scalar_type(), "afs_channel_loss_cuda", [&] {
    afs_kernel<scalar_t><<<C, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        anomalous.data_ptr<scalar_t>(), normal.data_ptr<scalar_t>(), mask.data_ptr<float>(), B, C, h, w,
        mask.size(2), mask.size(3), loss.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

}  // namespace

// The entry points of this version (declared in versions.h, dispatched in realnet_cuda.cu).
at::Tensor rrs_stats(at::TensorList feats, at::TensorList recons) { return rrs_stats_cuda(feats, recons); }
at::Tensor rrs_rank(const at::Tensor& stats, int64_t spatial, int64_t k_max, int64_t k_mean, at::Tensor& running_mean,
                    at::Tensor& running_var, bool training, double momentum, double eps) {
  return rrs_rank_cuda(stats, spatial, k_max, k_mean, running_mean, running_var, training, momentum, eps);
}
at::Tensor rrs_gather(at::TensorList feats, at::TensorList recons, const at::Tensor& indices) {
  return rrs_gather_cuda(feats, recons, indices);
}
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> rrs_gather_backward(
    const at::Tensor& grad, at::TensorList feats, at::TensorList recons, const at::Tensor& indices, bool need_feats,
    bool need_recons) {
  return rrs_gather_backward_cuda(grad, feats, recons, indices, need_feats, need_recons);
}
at::Tensor afs_channel_loss(const at::Tensor& anomalous, const at::Tensor& normal, const at::Tensor& mask) {
  return afs_channel_loss_cuda(anomalous, normal, mask);
}

}  // namespace v1
}  // namespace realnet
