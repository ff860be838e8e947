// CUDA kernels, version 2: bound by memory, not by latency or float64 work.
// Run on a GPU: not yet (written 2026-12-04 without one; compiled for sm_90 only).
//
// What changes from version 1 (v1.cu), and why. Paper shapes, batch 16: forward+backward
// must move about 600 MB (inputs read once, output written once, the upstream gradient
// read once, grad_recons written once), 0.14 ms at an H200's ~4.3 TB/s copy rate;
// version 1 took 2.5 ms on an H100, 7 % of its peak.
//   rrs_stats     16-byte loads of feats/recons at the output size; smaller levels are
//                 squared into shared memory once per plane and interpolated from there
//                 with per-block tap tables; 32-bit index arithmetic; float accumulation
//                 per thread and per warp (shifted sums, as in v1), float64 only across
//                 the 8 warps of a block (two-level: rounding stays ~1e-7 relative).
//   rrs_rank      one launch: each (sample, mode) block computes the batch statistics it
//                 needs, then bitonic-sorts (score, channel) pairs in shared memory:
//                 66 barrier steps for M = 1536 instead of M^2 float64 comparisons. The
//                 same total order as v1 (descending, NaN first, ties to the lower index).
//   rrs_gather    one block per output plane, 16-byte stores, the residual of a smaller
//                 level staged in shared memory (read once per plane, not 4x per pixel).
//   backward      one launch builds, per sample, each channel's list of output planes
//                 (replaces a sort and a searchsorted: ~8 launches); then one block per
//                 (sample, channel) writes its gradient plane exactly once (deterministic,
//                 no atomics): zeros when unpicked; at the output size a streaming
//                 16-byte pass; for smaller levels the picked gradient planes are summed
//                 into shared memory and the adjoint of the upsampling is applied
//                 separably (columns then rows), instead of a 2-D window per pixel that
//                 re-read the gradient ~(H/h)^2 times.
//   afs           one launch resizes the mask to the feature map (nearest) once; one
//                 block per channel keeps its squared differences in shared memory between
//                 the min/max pass and the loss pass (one read of the inputs, not two).
// Shapes beyond the shared-memory budgets below fall back to version 1 (same results).
#include "common.cuh"
#include "versions.h"

namespace realnet {
namespace v2 {
namespace {

constexpr int kBlock = 256;            // threads per block (8 warps)
constexpr int kRankThreads = 1024;     // rank: one block per (sample, mode)
constexpr int kMaxSharedBytes = 47 * 1024;  // dynamic, below the 48 KB a block gets without opting in

// A 16-byte pack of scalars: one vector load or store.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(scalar_t);
  scalar_t v[N];
};

template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t>*>(p);
}
template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t>& v) {
  *reinterpret_cast<Pack<scalar_t>*>(p) = v;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Output-to-source taps of one axis (align_corners=True), in shared memory.
template <typename acc_t>
struct TapS {
  int i0, i1;
  acc_t l0, l1;
};

template <typename acc_t>
__device__ __forceinline__ void fill_taps(TapS<acc_t>* taps, int out_size, int in_size) {
  const acc_t scale = align_corners_scale<acc_t>(in_size, out_size);
  for (int o = threadIdx.x; o < out_size; o += blockDim.x) {
    const auto t = source_tap<acc_t>(o, in_size, scale);
    taps[o] = {static_cast<int>(t.i0), static_cast<int>(t.i1), t.l0, t.l1};
  }
}

// Bilinear value at (ty, tx) of a residual plane of width w in shared memory; the same
// expression as v1 and the CPU kernel: l0y (l0x v00 + l1x v01) + l1y (l0x v10 + l1x v11).
template <typename acc_t>
__device__ __forceinline__ acc_t interpolate(const acc_t* res, int w, const TapS<acc_t>& ty,
                                             const TapS<acc_t>& tx) {
  const acc_t top = tx.l0 * res[ty.i0 * w + tx.i0] + tx.l1 * res[ty.i0 * w + tx.i1];
  const acc_t bottom = tx.l0 * res[ty.i1 * w + tx.i0] + tx.l1 * res[ty.i1 * w + tx.i1];
  return ty.l0 * top + ty.l1 * bottom;
}

// Row and column of a flat index that advances by a fixed step: one division per thread
// instead of one per element (a 32-bit division is ~20 instructions).
struct Walk2D {
  int y, x, dy, dx, width;
  __device__ __forceinline__ Walk2D(int start, int step, int width_)
      : y(start / width_), x(start % width_), dy(step / width_), dx(step % width_), width(width_) {}
  __device__ __forceinline__ void next() {
    x += dx;
    y += dy;
    if (x >= width) {
      x -= width;
      ++y;
    }
  }
};

// Levels as the v2 kernels see them: 32-bit sizes (the host checks that they fit).
template <typename scalar_t>
struct LevelsV2 {
  const scalar_t* feat[kMaxLevels];
  const scalar_t* recon[kMaxLevels];
  int channels[kMaxLevels], h[kMaxLevels], w[kMaxLevels], offset[kMaxLevels + 1];
  int count, H, W;
  bool vec;  // 16-byte packs: W divisible by the pack width, every level-sized plane aligned
};

template <typename scalar_t>
LevelsV2<scalar_t> make_levels_v2(const std::vector<at::Tensor>& feats, const std::vector<at::Tensor>& recons,
                                  const LevelsInfo& info) {
  LevelsV2<scalar_t> L;
  L.count = static_cast<int>(feats.size());
  L.H = static_cast<int>(info.height);
  L.W = static_cast<int>(info.width);
  L.vec = L.W % Pack<scalar_t>::N == 0;
  for (int l = 0; l < L.count; ++l) {
    L.feat[l] = feats[l].data_ptr<scalar_t>();
    L.recon[l] = recons[l].data_ptr<scalar_t>();
    L.channels[l] = static_cast<int>(feats[l].size(1));
    L.h[l] = static_cast<int>(feats[l].size(2));
    L.w[l] = static_cast<int>(feats[l].size(3));
    L.offset[l] = static_cast<int>(info.channel_offset[l]);
    L.vec = L.vec && aligned16(L.feat[l]) && aligned16(L.recon[l]);
  }
  L.offset[L.count] = static_cast<int>(info.channel_offset[L.count]);
  return L;
}

template <typename scalar_t>
__device__ __forceinline__ int locate_level(const LevelsV2<scalar_t>& L, int channel) {
  int l = 0;
  while (l + 1 < L.count && channel >= L.offset[l + 1]) ++l;
  return l;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t squared_difference(scalar_t f, scalar_t r) {
  const acc_t d = static_cast<acc_t>(f) - static_cast<acc_t>(r);
  return d * d;
}

// Shared memory of a kernel that stages one smaller level's residual plane (h x w) and the
// output-to-source taps of both axes; bytes, for the largest level that is not at (H, W).
template <typename acc_t>
size_t staging_bytes(const LevelsInfo& info, at::TensorList feats) {
  int64_t plane = 0;
  for (const auto& f : feats)
    if (f.size(2) != info.height || f.size(3) != info.width) plane = std::max<int64_t>(plane, f.size(2) * f.size(3));
  if (plane == 0) return 0;
  const size_t taps = (info.height + info.width) * sizeof(TapS<acc_t>);
  return taps + ((plane * sizeof(acc_t) + 15) / 16) * 16;
}

// Everything a v2 kernel indexes must fit in 32 bits, and shared memory in its budget;
// otherwise the caller falls back to version 1.
bool fits_int32(at::TensorList tensors) {
  for (const auto& t : tensors)
    if (t.numel() >= (int64_t(1) << 31)) return false;
  return true;
}

// Max, sum and sum of squares of a block (kBlock threads): warps in acc_t, the 8 warp
// results combined in double. Returns the totals in thread 0.
template <typename acc_t>
__device__ void block_stats(acc_t& peak, acc_t& s1, acc_t& s2, double& sum1, double& sum2) {
  __shared__ acc_t peaks[kBlock / 32];
  __shared__ double sums[2][kBlock / 32];
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t p = __shfl_down_sync(0xffffffff, peak, o);
    peak = p > peak ? p : peak;
    s1 += __shfl_down_sync(0xffffffff, s1, o);
    s2 += __shfl_down_sync(0xffffffff, s2, o);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    peaks[warp] = peak;
    sums[0][warp] = static_cast<double>(s1);
    sums[1][warp] = static_cast<double>(s2);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sum1 = 0;
    sum2 = 0;
    for (int i = 0; i < kBlock / 32; ++i) {
      peak = peaks[i] > peak ? peaks[i] : peak;
      sum1 += sums[0][i];
      sum2 += sums[1][i];
    }
  }
}

// ---------------------------------------------------------------------------------------
// rrs_stats: block (channel, sample)
// ---------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) stats_kernel(LevelsV2<scalar_t> L, int M, double* stats) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = Pack<scalar_t>::N;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int channel = blockIdx.x, b = blockIdx.y, B = gridDim.y;
  const int l = locate_level(L, channel);
  const int h = L.h[l], w = L.w[l], H = L.H, W = L.W, HW = H * W;
  const int64_t base = (static_cast<int64_t>(b) * L.channels[l] + channel - L.offset[l]) * h * w;
  const scalar_t* f = L.feat[l] + base;
  const scalar_t* r = L.recon[l] + base;
  acc_t peak = -std::numeric_limits<acc_t>::infinity(), s1 = 0, s2 = 0, shift;
  auto add = [&](acc_t v) {  // sums shifted by the first value: a stable variance in one pass
    peak = v > peak ? v : peak;
    const acc_t d = v - shift;
    s1 += d;
    s2 += d * d;
  };
  if (h == H && w == W) {
    shift = squared_difference<scalar_t, acc_t>(f[0], r[0]);
    if (L.vec) {
      for (int q = threadIdx.x * N; q < HW; q += kBlock * N) {
        const auto fv = load_pack(f + q), rv = load_pack(r + q);
#pragma unroll
        for (int k = 0; k < N; ++k) add(squared_difference<scalar_t, acc_t>(fv.v[k], rv.v[k]));
      }
    } else {
      for (int q = threadIdx.x; q < HW; q += kBlock) add(squared_difference<scalar_t, acc_t>(f[q], r[q]));
    }
  } else {
    auto* taps_y = reinterpret_cast<TapS<acc_t>*>(shared_raw);
    auto* taps_x = taps_y + H;
    auto* res = reinterpret_cast<acc_t*>(taps_x + W);
    for (int q = threadIdx.x; q < h * w; q += kBlock) res[q] = squared_difference<scalar_t, acc_t>(f[q], r[q]);
    fill_taps(taps_y, H, h);
    fill_taps(taps_x, W, w);
    __syncthreads();
    shift = interpolate(res, w, taps_y[0], taps_x[0]);
    Walk2D at(threadIdx.x, kBlock, W);
    for (int p = threadIdx.x; p < HW; p += kBlock, at.next()) add(interpolate(res, w, taps_y[at.y], taps_x[at.x]));
  }
  double sum1, sum2;
  block_stats(peak, s1, s2, sum1, sum2);
  if (threadIdx.x == 0) {
    const double m1 = sum1 / HW;
    double var = sum2 / HW - m1 * m1;
    var = var < 0 ? 0 : var;
    const int64_t at = static_cast<int64_t>(b) * M + channel, plane = static_cast<int64_t>(B) * M;
    stats[at] = isnan(sum1) ? sum1 : static_cast<double>(peak);
    stats[plane + at] = static_cast<double>(shift) + m1;
    stats[2 * plane + at] = var;
  }
}

at::Tensor rrs_stats_cuda(at::TensorList feats_in, at::TensorList recons_in) {
  const auto info = check_levels("rrs_stats", feats_in, recons_in);
  const c10::cuda::CUDAGuard guard(feats_in[0].device());
  const auto feats = contiguous_all(feats_in), recons = contiguous_all(recons_in);
  const int64_t B = info.batch, M = info.channels;
  size_t shared = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "rrs_stats_v2", [&] {
    shared = staging_bytes<acc_type<scalar_t>>(info, feats_in);
  });
  if (!fits_int32(feats) || shared > kMaxSharedBytes || B > 65535) return v1::rrs_stats(feats_in, recons_in);
  auto stats = at::empty({3, B, M}, feats[0].options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "rrs_stats_v2", [&] {
    const auto L = make_levels_v2<scalar_t>(feats, recons, info);
    stats_kernel<scalar_t><<<dim3(M, B), kBlock, shared, c10::cuda::getCurrentCUDAStream()>>>(
        L, static_cast<int>(M), stats.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return stats;
}

// ---------------------------------------------------------------------------------------
// rrs_rank: block (sample, mode) of kRankThreads; keys and channels in shared memory
// ---------------------------------------------------------------------------------------

// An unsigned key whose order is the order of the scores: descending key = descending
// score, every NaN above +inf (NaN first, as v1), -0 equal to +0.
__device__ __forceinline__ unsigned long long order_key(double score) {
  if (isnan(score)) return ~0ull;
  if (score == 0) score = 0;  // -0 -> +0
  const unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(score));
  return (bits >> 63) ? ~bits : bits | (1ull << 63);
}

template <typename stat_t>
__global__ void __launch_bounds__(kRankThreads) rank_kernel(const double* stats, int B, int M, int64_t spatial,
                                                            stat_t* run_mean, stat_t* run_var, bool training,
                                                            double momentum, double eps, int k_max, int k_mean,
                                                            int sorted_size, int64_t* indices) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  auto* keys = reinterpret_cast<unsigned long long*>(shared_raw);
  auto* channel_of = reinterpret_cast<int*>(keys + sorted_size);
  const int b = blockIdx.x, mode = blockIdx.y;  // mode 0: spatial max, 1: spatial mean
  const int k = mode == 0 ? k_max : k_mean, first = mode == 0 ? 0 : k_max, K = k_max + k_mean;
  if (k == 0) return;
  const int64_t plane = static_cast<int64_t>(B) * M;
  const double* mean = stats + plane;
  const double* var = stats + 2 * plane;
  const double* stat = stats + mode * plane + static_cast<int64_t>(b) * M;
  // BatchNorm statistics of every channel (each block recomputes them: B*M reads from L2
  // cost less than a launch); one block updates the running ones.
  const bool updates = training && b == 0 && mode == (k_max > 0 ? 0 : 1);  // a block that runs
  for (int c = threadIdx.x; c < sorted_size; c += kRankThreads) {
    if (c >= M) {  // padding: sorts after every real channel (its key is below -inf's)
      keys[c] = 0;
      channel_of[c] = c;
      continue;
    }
    double mu, sigma2;
    if (training) {
      mu = 0;
      for (int i = 0; i < B; ++i) mu += mean[static_cast<int64_t>(i) * M + c];
      mu /= B;
      sigma2 = 0;
      for (int i = 0; i < B; ++i) {
        const double d = mean[static_cast<int64_t>(i) * M + c] - mu;
        sigma2 += var[static_cast<int64_t>(i) * M + c] + d * d;
      }
      sigma2 /= B;
      if (updates) {
        const double count = static_cast<double>(B) * spatial;
        run_mean[c] = static_cast<stat_t>(momentum * mu + (1.0 - momentum) * static_cast<double>(run_mean[c]));
        run_var[c] = static_cast<stat_t>(momentum * sigma2 * count / (count - 1.0) +
                                         (1.0 - momentum) * static_cast<double>(run_var[c]));
      }
    } else {
      mu = static_cast<double>(run_mean[c]);
      sigma2 = static_cast<double>(run_var[c]);
    }
    keys[c] = order_key((stat[c] - mu) * (1.0 / sqrt(sigma2 + eps)));
    channel_of[c] = c;
  }
  __syncthreads();
  // Bitonic sort into "precedes" order: larger key first, then the lower channel.
  for (int size = 2; size <= sorted_size; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < sorted_size / 2; t += kRankThreads) {
        const int i = 2 * t - (t & (stride - 1)), j = i + stride;
        const unsigned long long ki = keys[i], kj = keys[j];
        const int ci = channel_of[i], cj = channel_of[j];
        const bool j_first = kj > ki || (kj == ki && cj < ci);
        const bool ascending = (i & size) == 0;  // this run sorts into "precedes" order
        if (ascending == j_first) {
          keys[i] = kj;
          keys[j] = ki;
          channel_of[i] = cj;
          channel_of[j] = ci;
        }
      }
      __syncthreads();
    }
  }
  for (int r = threadIdx.x; r < k; r += kRankThreads)
    indices[static_cast<int64_t>(b) * K + first + r] = channel_of[r];
}

at::Tensor rrs_rank_cuda(const at::Tensor& stats_in, int64_t spatial, int64_t k_max, int64_t k_mean,
                         at::Tensor& running_mean, at::Tensor& running_var, bool training, double momentum,
                         double eps) {
  check_rank_args(stats_in, spatial, k_max, k_mean, running_mean, running_var, training);
  const int64_t B = stats_in.size(1), M = stats_in.size(2);
  int64_t sorted_size = 2;
  while (sorted_size < M) sorted_size <<= 1;
  const size_t shared = sorted_size * (sizeof(unsigned long long) + sizeof(int));
  if (shared > kMaxSharedBytes || B > 65535)
    return v1::rrs_rank(stats_in, spatial, k_max, k_mean, running_mean, running_var, training, momentum, eps);
  const c10::cuda::CUDAGuard guard(stats_in.device());
  const auto stats = stats_in.contiguous();
  auto indices = at::empty({B, k_max + k_mean}, stats.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "rrs_rank_v2", [&] {
    rank_kernel<scalar_t><<<dim3(B, 2), kRankThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
        stats.data_ptr<double>(), static_cast<int>(B), static_cast<int>(M), spatial,
        running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(), training, momentum, eps,
        static_cast<int>(k_max), static_cast<int>(k_mean), static_cast<int>(sorted_size),
        indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return indices;
}

// ---------------------------------------------------------------------------------------
// rrs_gather: block (output plane j, sample)
// ---------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) gather_kernel(LevelsV2<scalar_t> L, const int64_t* indices, int M,
                                                        scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = Pack<scalar_t>::N;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int j = blockIdx.x, K = gridDim.x, b = blockIdx.y;
  const int64_t picked = indices[static_cast<int64_t>(b) * K + j];
  CUDA_KERNEL_ASSERT(picked >= 0 && picked < M);
  const int channel = static_cast<int>(picked);
  const int l = locate_level(L, channel);
  const int h = L.h[l], w = L.w[l], H = L.H, W = L.W, HW = H * W;
  const int64_t base = (static_cast<int64_t>(b) * L.channels[l] + channel - L.offset[l]) * h * w;
  const scalar_t* f = L.feat[l] + base;
  const scalar_t* r = L.recon[l] + base;
  scalar_t* plane = out + (static_cast<int64_t>(b) * K + j) * HW;
  if (h == H && w == W) {
    if (L.vec) {
      for (int q = threadIdx.x * N; q < HW; q += kBlock * N) {
        const auto fv = load_pack(f + q), rv = load_pack(r + q);
        Pack<scalar_t> o;
#pragma unroll
        for (int k = 0; k < N; ++k) o.v[k] = static_cast<scalar_t>(squared_difference<scalar_t, acc_t>(fv.v[k], rv.v[k]));
        store_pack(plane + q, o);
      }
    } else {
      for (int q = threadIdx.x; q < HW; q += kBlock)
        plane[q] = static_cast<scalar_t>(squared_difference<scalar_t, acc_t>(f[q], r[q]));
    }
    return;
  }
  auto* taps_y = reinterpret_cast<TapS<acc_t>*>(shared_raw);
  auto* taps_x = taps_y + H;
  auto* res = reinterpret_cast<acc_t*>(taps_x + W);
  for (int q = threadIdx.x; q < h * w; q += kBlock) res[q] = squared_difference<scalar_t, acc_t>(f[q], r[q]);
  fill_taps(taps_y, H, h);
  fill_taps(taps_x, W, w);
  __syncthreads();
  if (L.vec) {  // W is a multiple of N: a pack never crosses a row
    Walk2D at(threadIdx.x, kBlock, W / N);  // in packs
    for (int p = threadIdx.x; p < HW / N; p += kBlock, at.next()) {
      const int y = at.y, x0 = at.x * N;
      const auto ty = taps_y[y];
      Pack<scalar_t> o;
#pragma unroll
      for (int k = 0; k < N; ++k) o.v[k] = static_cast<scalar_t>(interpolate(res, w, ty, taps_x[x0 + k]));
      store_pack(plane + y * W + x0, o);
    }
  } else {
    Walk2D at(threadIdx.x, kBlock, W);
    for (int p = threadIdx.x; p < HW; p += kBlock, at.next())
      plane[p] = static_cast<scalar_t>(interpolate(res, w, taps_y[at.y], taps_x[at.x]));
  }
}

at::Tensor rrs_gather_cuda(at::TensorList feats_in, at::TensorList recons_in, const at::Tensor& indices_in) {
  const auto info = check_levels("rrs_gather", feats_in, recons_in);
  check_indices("rrs_gather", indices_in, info, feats_in[0]);
  const int64_t B = info.batch, K = indices_in.size(1);
  size_t shared = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats_in[0].scalar_type(), "rrs_gather_v2", [&] {
    shared = staging_bytes<acc_type<scalar_t>>(info, feats_in);
  });
  if (!fits_int32(feats_in) || B * K * info.height * info.width >= (int64_t(1) << 31) ||
      shared > kMaxSharedBytes || B > 65535 || K >= (int64_t(1) << 31))
    return v1::rrs_gather(feats_in, recons_in, indices_in);
  const c10::cuda::CUDAGuard guard(feats_in[0].device());
  const auto feats = contiguous_all(feats_in), recons = contiguous_all(recons_in);
  const auto indices = indices_in.contiguous();
  auto selected = at::empty({B, K, info.height, info.width}, feats[0].options());
  if (B * K == 0) return selected;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "rrs_gather_v2", [&] {
    auto L = make_levels_v2<scalar_t>(feats, recons, info);
    L.vec = L.vec && aligned16(selected.data_ptr());
    gather_kernel<scalar_t><<<dim3(K, B), kBlock, shared, c10::cuda::getCurrentCUDAStream()>>>(
        L, indices.data_ptr<int64_t>(), static_cast<int>(info.channels), selected.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return selected;
}

// ---------------------------------------------------------------------------------------
// rrs_gather_backward
// ---------------------------------------------------------------------------------------

// Block-wide exclusive prefix sum of a[0, n) in shared memory, in place; a[n] = the total.
__device__ void exclusive_scan(int* a, int n) {
  __shared__ int warp_totals[32];
  const int threads = blockDim.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int per = (n + threads - 1) / threads;
  const int lo = min(n, threadIdx.x * per), hi = min(n, lo + per);
  int sum = 0;
  for (int i = lo; i < hi; ++i) sum += a[i];
  int inclusive = sum;
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffff, inclusive, o);
    if (lane >= o) inclusive += t;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int total = lane < threads / 32 ? warp_totals[lane] : 0;
    int running = total;
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffff, running, o);
      if (lane >= o) running += t;
    }
    warp_totals[lane] = running - total;  // exclusive: the warps before this one
  }
  __syncthreads();
  int prefix = warp_totals[warp] + inclusive - sum;
  for (int i = lo; i < hi; ++i) {
    const int t = a[i];
    a[i] = prefix;
    prefix += t;
  }
  if (threadIdx.x == threads - 1) a[n] = prefix;
  __syncthreads();
}

// Per sample, the output planes j that picked each channel, in ascending j (the order in
// which duplicated picks are summed): start (B, M + 1) and planes (B, K), as a CSR.
constexpr int kListThreads = 1024;

__global__ void __launch_bounds__(kListThreads) pick_lists_kernel(const int64_t* indices, int M, int K, int* start,
                                                                  int* planes) {
  extern __shared__ int shared_int[];
  int* count = shared_int;       // M + 1
  int* row = shared_int + M + 1;  // K
  const int b = blockIdx.x;
  for (int c = threadIdx.x; c <= M; c += kListThreads) count[c] = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < K; j += kListThreads) {
    const int64_t c = indices[static_cast<int64_t>(b) * K + j];
    CUDA_KERNEL_ASSERT(c >= 0 && c < M);
    row[j] = static_cast<int>(c);
    atomicAdd(&count[c], 1);
  }
  __syncthreads();
  exclusive_scan(count, M);
  for (int c = threadIdx.x; c <= M; c += kListThreads) start[static_cast<int64_t>(b) * (M + 1) + c] = count[c];
  for (int j = threadIdx.x; j < K; j += kListThreads) {
    const int c = row[j];
    int earlier = 0;  // picks of the same channel before j: duplicates are rare, K is small
    for (int i = 0; i < j; ++i) earlier += row[i] == c;
    planes[static_cast<int64_t>(b) * K + count[c] + earlier] = j;
  }
}

// The outputs that read source position i along one axis (inclusive window), and weights.
struct WindowS {
  int first, last;
};

template <typename acc_t>
__device__ __forceinline__ void fill_windows(WindowS* windows, int in_size, int out_size) {
  const acc_t scale = align_corners_scale<acc_t>(in_size, out_size);
  for (int i = threadIdx.x; i < in_size; i += blockDim.x) {
    const auto win = source_window<acc_t>(i, in_size, out_size, scale);
    windows[i] = {static_cast<int>(win.first), static_cast<int>(win.last)};
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t weight_of(const TapS<acc_t>& t, int i) {
  return (t.i0 == i ? t.l0 : acc_t(0)) + (t.i1 == i ? t.l1 : acc_t(0));
}

// Where the per-level gradients go (nullptr: not needed), passed by value.
template <typename scalar_t>
struct GradOutV2 {
  scalar_t* feats[kMaxLevels];
  scalar_t* recons[kMaxLevels];
};

// Shared memory of the backward: the summed gradient plane (H x W), the column pass
// (H x w), taps of both axes, windows of both source axes.
template <typename acc_t>
size_t backward_bytes(const LevelsInfo& info, at::TensorList feats) {
  int64_t h = 0, w = 0;
  bool any = false;
  for (const auto& f : feats)
    if (f.size(2) != info.height || f.size(3) != info.width) {
      any = true;
      h = std::max<int64_t>(h, f.size(2));
      w = std::max<int64_t>(w, f.size(3));
    }
  if (!any) return 0;
  const int64_t H = info.height, W = info.width;
  return (H + W) * sizeof(TapS<acc_t>) + (h + w) * sizeof(WindowS) + (H * W + H * w) * sizeof(acc_t) + 16;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) gather_backward_kernel(LevelsV2<scalar_t> L, const scalar_t* grad,
                                                                 const int* start, const int* planes, int K,
                                                                 GradOutV2<scalar_t> out) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = Pack<scalar_t>::N;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int channel = blockIdx.x, M = gridDim.x, b = blockIdx.y;
  const int l = locate_level(L, channel);
  const int h = L.h[l], w = L.w[l], n = h * w, H = L.H, W = L.W, HW = H * W;
  const int64_t base = (static_cast<int64_t>(b) * L.channels[l] + channel - L.offset[l]) * n;
  scalar_t *gf = nullptr, *gr = nullptr;
#pragma unroll
  for (int i = 0; i < kMaxLevels; ++i)  // a constant index: the pointers stay out of local memory
    if (i == l) {
      gf = out.feats[i] ? out.feats[i] + base : nullptr;
      gr = out.recons[i] ? out.recons[i] + base : nullptr;
    }
  const scalar_t* f = L.feat[l] + base;
  const scalar_t* r = L.recon[l] + base;
  const int* pick = planes + static_cast<int64_t>(b) * K;
  const int64_t at = static_cast<int64_t>(b) * (M + 1) + channel;
  const int first_pick = start[at], end_pick = start[at + 1];
  const scalar_t* grad_b = grad + static_cast<int64_t>(b) * K * HW;
  const bool identity = h == H && w == W;
  const bool vec = L.vec && (identity || n % N == 0);  // n % N: the plane starts aligned

  if (first_pick == end_pick) {  // not picked: a zero gradient
    if (vec) {
      Pack<scalar_t> zero;
#pragma unroll
      for (int k = 0; k < N; ++k) zero.v[k] = scalar_t(0);
      for (int q = threadIdx.x * N; q < n; q += kBlock * N) {
        if (gf) store_pack(gf + q, zero);
        if (gr) store_pack(gr + q, zero);
      }
    } else {
      for (int q = threadIdx.x; q < n; q += kBlock) {
        if (gf) gf[q] = scalar_t(0);
        if (gr) gr[q] = scalar_t(0);
      }
    }
    return;
  }
  auto write = [&](int q, acc_t g) {  // d(selected)/d(feats) = 2 (f - r) g, recons: its negative
    const acc_t v = acc_t(2) * (static_cast<acc_t>(f[q]) - static_cast<acc_t>(r[q])) * g;
    if (gf) gf[q] = static_cast<scalar_t>(v);
    if (gr) gr[q] = static_cast<scalar_t>(-v);
  };
  if (identity) {  // a streaming pass: the picked planes summed, times 2 (f - r)
    if (vec) {
      for (int q = threadIdx.x * N; q < n; q += kBlock * N) {
        acc_t g[N];
#pragma unroll
        for (int k = 0; k < N; ++k) g[k] = 0;
        for (int p = first_pick; p < end_pick; ++p) {
          const auto gv = load_pack(grad_b + static_cast<int64_t>(pick[p]) * HW + q);
#pragma unroll
          for (int k = 0; k < N; ++k) g[k] += static_cast<acc_t>(gv.v[k]);
        }
        const auto fv = load_pack(f + q), rv = load_pack(r + q);
        Pack<scalar_t> of, orr;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const acc_t v = acc_t(2) * (static_cast<acc_t>(fv.v[k]) - static_cast<acc_t>(rv.v[k])) * g[k];
          of.v[k] = static_cast<scalar_t>(v);
          orr.v[k] = static_cast<scalar_t>(-v);
        }
        if (gf) store_pack(gf + q, of);
        if (gr) store_pack(gr + q, orr);
      }
    } else {
      for (int q = threadIdx.x; q < n; q += kBlock) {
        acc_t g = 0;
        for (int p = first_pick; p < end_pick; ++p) g += static_cast<acc_t>(grad_b[static_cast<int64_t>(pick[p]) * HW + q]);
        write(q, g);
      }
    }
    return;
  }
  // A smaller level: sum the picked planes into shared memory, then the adjoint of the
  // bilinear upsampling, separably: columns (x -> j) into an H x w plane, then rows.
  auto* taps_y = reinterpret_cast<TapS<acc_t>*>(shared_raw);
  auto* taps_x = taps_y + H;
  auto* rows_of = reinterpret_cast<WindowS*>(taps_x + W);  // source row i <- outputs y
  auto* cols_of = rows_of + h;                             // source column j <- outputs x
  const uintptr_t after = reinterpret_cast<uintptr_t>(cols_of + w);
  auto* summed = reinterpret_cast<acc_t*>((after + 15) / 16 * 16);  // H x W
  auto* columns = summed + HW;                                      // H x w
  fill_taps(taps_y, H, h);
  fill_taps(taps_x, W, w);
  fill_windows<acc_t>(rows_of, h, H);
  fill_windows<acc_t>(cols_of, w, W);
  if (L.vec) {
    for (int q = threadIdx.x * N; q < HW; q += kBlock * N) {
      acc_t g[N];
#pragma unroll
      for (int k = 0; k < N; ++k) g[k] = 0;
      for (int p = first_pick; p < end_pick; ++p) {
        const auto gv = load_pack(grad_b + static_cast<int64_t>(pick[p]) * HW + q);
#pragma unroll
        for (int k = 0; k < N; ++k) g[k] += static_cast<acc_t>(gv.v[k]);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) summed[q + k] = g[k];
    }
  } else {
    for (int q = threadIdx.x; q < HW; q += kBlock) {
      acc_t g = 0;
      for (int p = first_pick; p < end_pick; ++p) g += static_cast<acc_t>(grad_b[static_cast<int64_t>(pick[p]) * HW + q]);
      summed[q] = g;
    }
  }
  __syncthreads();
  Walk2D column_at(threadIdx.x, kBlock, w);
  for (int e = threadIdx.x; e < H * w; e += kBlock, column_at.next()) {
    const int y = column_at.y, j = column_at.x;
    const WindowS win = cols_of[j];
    acc_t sum = 0;
    for (int x = win.first; x <= win.last; ++x) sum += weight_of(taps_x[x], j) * summed[y * W + x];
    columns[e] = sum;
  }
  __syncthreads();
  Walk2D row_at(threadIdx.x, kBlock, w);
  for (int q = threadIdx.x; q < n; q += kBlock, row_at.next()) {
    const int i = row_at.y, j = row_at.x;
    const WindowS win = rows_of[i];
    acc_t g = 0;
    for (int y = win.first; y <= win.last; ++y) g += weight_of(taps_y[y], i) * columns[y * w + j];
    write(q, g);
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
  size_t shared = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats_in[0].scalar_type(), "rrs_gather_backward_v2", [&] {
    shared = backward_bytes<acc_type<scalar_t>>(info, feats_in);
  });
  const size_t list_shared = (M + 1 + K) * sizeof(int);
  if (!fits_int32(feats_in) || grad_in.numel() >= (int64_t(1) << 31) || shared > kMaxSharedBytes ||
      list_shared > kMaxSharedBytes || B > 65535 || M > 65535)
    return v1::rrs_gather_backward(grad_in, feats_in, recons_in, indices_in, need_feats, need_recons);
  const c10::cuda::CUDAGuard guard(feats_in[0].device());
  const auto feats = contiguous_all(feats_in), recons = contiguous_all(recons_in);
  const auto grad = grad_in.contiguous();
  const auto indices = indices_in.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> grad_feats, grad_recons;
  for (size_t l = 0; l < feats.size(); ++l) {
    if (need_feats) grad_feats.push_back(at::empty_like(feats[l]));
    if (need_recons) grad_recons.push_back(at::empty_like(recons[l]));
  }
  if (!need_feats && !need_recons) return {grad_feats, grad_recons};
  auto start = at::empty({B, M + 1}, indices.options().dtype(at::kInt));
  auto planes = at::empty({B, std::max<int64_t>(K, 1)}, indices.options().dtype(at::kInt));
  pick_lists_kernel<<<B, kListThreads, list_shared, stream>>>(indices.data_ptr<int64_t>(), static_cast<int>(M),
                                                             static_cast<int>(K), start.data_ptr<int>(),
                                                             planes.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "rrs_gather_backward_v2", [&] {
    auto L = make_levels_v2<scalar_t>(feats, recons, info);
    L.vec = L.vec && aligned16(grad.data_ptr());
    GradOutV2<scalar_t> out{};
    for (size_t l = 0; l < feats.size(); ++l) {
      out.feats[l] = need_feats ? grad_feats[l].data_ptr<scalar_t>() : nullptr;
      out.recons[l] = need_recons ? grad_recons[l].data_ptr<scalar_t>() : nullptr;
      // fresh allocations are aligned; zero planes use packs where a plane size allows
    }
    gather_backward_kernel<scalar_t><<<dim3(M, B), kBlock, shared, stream>>>(
        L, grad.data_ptr<scalar_t>(), start.data_ptr<int>(), planes.data_ptr<int>(), static_cast<int>(K), out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_feats, grad_recons};
}

// ---------------------------------------------------------------------------------------
// afs_channel_loss
// ---------------------------------------------------------------------------------------

// The mask resized to the feature map (nearest, as F.interpolate): (B, h, w) float.
__global__ void afs_labels_kernel(const float* mask, int B, int h, int w, int MH, int MW, float* labels) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= B * h * w) return;
  const int b = e / (h * w), p = e - b * h * w, y = p / w, x = p - y * w;
  labels[e] = mask[(static_cast<int64_t>(b) * MH + nearest_source(y, MH, h)) * MW + nearest_source(x, MW, w)];
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) afs_kernel(const scalar_t* anomalous, const scalar_t* normal,
                                                     const float* labels, int B, int C, int hw, bool vec,
                                                     float* loss) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = Pack<scalar_t>::N;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ acc_t low_high[2][kBlock / 32];
  __shared__ double sums[kBlock / 32];
  acc_t* d2 = reinterpret_cast<acc_t*>(shared_raw);  // B x hw squared differences
  const int c = blockIdx.x, n = B * hw, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  acc_t low = std::numeric_limits<acc_t>::infinity(), high = -low;
  auto keep = [&](int e, acc_t v) {
    d2[e] = v;
    low = v < low ? v : low;
    high = v > high ? v : high;
  };
  for (int b = 0; b < B; ++b) {
    const int64_t plane = (static_cast<int64_t>(b) * C + c) * hw;
    if (vec) {
      for (int q = threadIdx.x * N; q < hw; q += kBlock * N) {
        const auto av = load_pack(anomalous + plane + q), nv = load_pack(normal + plane + q);
#pragma unroll
        for (int k = 0; k < N; ++k) keep(b * hw + q + k, squared_difference<scalar_t, acc_t>(av.v[k], nv.v[k]));
      }
    } else {
      for (int q = threadIdx.x; q < hw; q += kBlock)
        keep(b * hw + q, squared_difference<scalar_t, acc_t>(anomalous[plane + q], normal[plane + q]));
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t lo = __shfl_down_sync(0xffffffff, low, o), hi = __shfl_down_sync(0xffffffff, high, o);
    low = lo < low ? lo : low;
    high = hi > high ? hi : high;
  }
  if (lane == 0) {
    low_high[0][warp] = low;
    low_high[1][warp] = high;
  }
  __syncthreads();  // also: every d2 written
  low = low_high[0][0];
  high = low_high[1][0];
  for (int i = 1; i < kBlock / 32; ++i) {
    low = low_high[0][i] < low ? low_high[0][i] : low;
    high = low_high[1][i] > high ? low_high[1][i] : high;
  }
  const acc_t range = high - low + static_cast<acc_t>(kAfsEps);
  acc_t partial = 0;
  for (int e = threadIdx.x; e < n; e += kBlock) {
    const acc_t err = (d2[e] - low) / range - static_cast<acc_t>(labels[e]);
    partial += err * err;
  }
  for (int o = 16; o > 0; o >>= 1) partial += __shfl_down_sync(0xffffffff, partial, o);
  if (lane == 0) sums[warp] = static_cast<double>(partial);
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int i = 0; i < kBlock / 32; ++i) total += sums[i];
    loss[c] = static_cast<float>(total / n);
  }
}

at::Tensor afs_channel_loss_cuda(const at::Tensor& anomalous_in, const at::Tensor& normal_in,
                                 const at::Tensor& mask_in) {
  check_afs(anomalous_in, normal_in, mask_in);
  const int64_t B = anomalous_in.size(0), C = anomalous_in.size(1), h = anomalous_in.size(2),
                w = anomalous_in.size(3);
  size_t shared = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anomalous_in.scalar_type(), "afs_channel_loss_v2", [&] {
    shared = B * h * w * sizeof(acc_type<scalar_t>);
  });
  if (shared > kMaxSharedBytes || anomalous_in.numel() >= (int64_t(1) << 31) || mask_in.numel() >= (int64_t(1) << 31))
    return v1::afs_channel_loss(anomalous_in, normal_in, mask_in);
  const c10::cuda::CUDAGuard guard(anomalous_in.device());
  const auto anomalous = anomalous_in.contiguous(), normal = normal_in.contiguous();
  const auto mask = mask_in.to(at::kFloat).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto labels = at::empty({B, h, w}, anomalous.options().dtype(at::kFloat));
  const int count = static_cast<int>(B * h * w);
  afs_labels_kernel<<<(count + kBlock - 1) / kBlock, kBlock, 0, stream>>>(
      mask.data_ptr<float>(), static_cast<int>(B), static_cast<int>(h), static_cast<int>(w),
      static_cast<int>(mask.size(2)), static_cast<int>(mask.size(3)), labels.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto loss = at::empty({C}, anomalous.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anomalous.scalar_type(), "afs_channel_loss_v2", [&] {
    const bool vec = (h * w) % Pack<scalar_t>::N == 0 && aligned16(anomalous.data_ptr()) &&
                     aligned16(normal.data_ptr());
    afs_kernel<scalar_t><<<C, kBlock, shared, stream>>>(anomalous.data_ptr<scalar_t>(), normal.data_ptr<scalar_t>(),
                                                        labels.data_ptr<float>(), static_cast<int>(B),
                                                        static_cast<int>(C), static_cast<int>(h * w), vec,
                                                        loss.data_ptr<float>());
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

}  // namespace v2
}  // namespace realnet
