// Shared by every version of the CUDA kernels (v1.cu, v2.cu): the levels as kernels see
// them, the upsampled residual computed on the fly, block reductions.
#pragma once

#include <ATen/Dispatch.h>
// c10 headers only: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers that a
// bare CUDA toolkit (like the one on CI) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <tuple>

#include "../realnet.h"

namespace realnet {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// All levels, passed to kernels by value.
template <typename scalar_t>
struct Levels {
  const scalar_t* feat[kMaxLevels];
  const scalar_t* recon[kMaxLevels];
  int64_t channels[kMaxLevels], h[kMaxLevels], w[kMaxLevels], offset[kMaxLevels + 1];
  int count;
  int64_t H, W;
};

template <typename scalar_t>
Levels<scalar_t> make_levels(const std::vector<at::Tensor>& feats, const std::vector<at::Tensor>& recons,
                             const LevelsInfo& info) {
  Levels<scalar_t> L;
  L.count = static_cast<int>(feats.size());
  for (int l = 0; l < L.count; ++l) {
    L.feat[l] = feats[l].data_ptr<scalar_t>();
    L.recon[l] = recons[l].data_ptr<scalar_t>();
    L.channels[l] = feats[l].size(1);
    L.h[l] = feats[l].size(2);
    L.w[l] = feats[l].size(3);
    L.offset[l] = info.channel_offset[l];
  }
  L.offset[L.count] = info.channel_offset[L.count];
  L.H = info.height;
  L.W = info.width;
  return L;
}

template <typename scalar_t>
__device__ __forceinline__ int locate(const Levels<scalar_t>& L, int64_t channel) {
  int l = 0;
  while (l + 1 < L.count && channel >= L.offset[l + 1]) ++l;
  return l;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t residual(const scalar_t* f, const scalar_t* r, int64_t p) {
  const acc_t d = static_cast<acc_t>(f[p]) - static_cast<acc_t>(r[p]);
  return d * d;
}

// The upsampled residual at output pixel (y, x) of plane `base` of level l; the same
// expression as the CPU kernel: l0y * (l0x v00 + l1x v01) + l1y * (l0x v10 + l1x v11).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t upsampled(const Levels<scalar_t>& L, int l, int64_t base, int64_t y, int64_t x) {
  const scalar_t* f = L.feat[l] + base;
  const scalar_t* r = L.recon[l] + base;
  const int64_t h = L.h[l], w = L.w[l];
  if (h == L.H && w == L.W) return residual<scalar_t, acc_t>(f, r, y * w + x);
  const auto ty = source_tap<acc_t>(y, h, align_corners_scale<acc_t>(h, L.H));
  const auto tx = source_tap<acc_t>(x, w, align_corners_scale<acc_t>(w, L.W));
  const acc_t top = tx.l0 * residual<scalar_t, acc_t>(f, r, ty.i0 * w + tx.i0) +
                    tx.l1 * residual<scalar_t, acc_t>(f, r, ty.i0 * w + tx.i1);
  const acc_t bottom = tx.l0 * residual<scalar_t, acc_t>(f, r, ty.i1 * w + tx.i0) +
                       tx.l1 * residual<scalar_t, acc_t>(f, r, ty.i1 * w + tx.i1);
  return ty.l0 * top + ty.l1 * bottom;
}

// Block-wide reduction (blockDim.x == kThreads); `identity` fills the unused lanes.
template <typename T, typename Op>
__device__ T block_reduce(T value, Op op, T identity, T* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_down_sync(0xffffffff, value, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? shared[lane] : identity;
    for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_down_sync(0xffffffff, value, offset));
    if (lane == 0) shared[0] = value;
  }
  __syncthreads();
  return shared[0];
}

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {  // NaN-ignoring, like the CPU kernel's comparison
  template <typename T>
  __device__ T operator()(T a, T b) const { return b > a ? b : a; }
};
struct Min {
  template <typename T>
  __device__ T operator()(T a, T b) const { return b < a ? b : a; }
};

std::vector<at::Tensor> contiguous_all(at::TensorList list) {
  std::vector<at::Tensor> out;
  for (const auto& t : list) out.push_back(t.contiguous());
  return out;
}

}  // namespace
}  // namespace realnet
