// CPU kernels of the realnet ops (float32 and float64). Parallel over (sample, channel)
// with at::parallel_for (OpenMP in PyTorch's builds). Each task works on one channel
// plane and keeps its intermediate rows in small thread-local buffers, so the upsampled
// residual of the whole batch (B x M x H x W) never exists in memory.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>

#include "../realnet.h"

namespace realnet {
namespace {

// `#pragma` cannot stand inside AT_DISPATCH's lambda (a macro argument); _Pragma can.
// `omp simd reduction` lets the compiler vectorise float reductions (reassociation).
#define RN_PRAGMA(x) _Pragma(#x)

// float for float inputs, double for double (as PyTorch's CPU "opmath" type).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// One feature level, contiguous (B, C, h, w), and the taps that upsample it to (H, W).
template <typename scalar_t>
struct Level {
  const scalar_t* feat;
  const scalar_t* recon;
  int64_t channels, h, w;
  bool identity;  // already at the output size: no interpolation
  std::vector<Tap<acc_type<scalar_t>>> rows, cols;  // forward: output -> its two sources
  // backward: source -> the window of outputs that read it, and their weights
  std::vector<Window> row_windows, col_windows;
  std::vector<std::vector<acc_type<scalar_t>>> row_weights, col_weights;
};

template <typename acc_t>
void adjoint_taps(int64_t in_size, int64_t out_size, acc_t scale, std::vector<Window>& windows,
                  std::vector<std::vector<acc_t>>& weights) {
  for (int64_t i = 0; i < in_size; ++i) {
    const Window win = source_window<acc_t>(i, in_size, out_size, scale);
    std::vector<acc_t> wt;
    for (int64_t o = win.first; o <= win.last; ++o) wt.push_back(tap_weight<acc_t>(o, i, in_size, scale));
    windows.push_back(win);
    weights.push_back(std::move(wt));
  }
}

template <typename scalar_t>
std::vector<Level<scalar_t>> make_levels(const std::vector<at::Tensor>& feats,
                                         const std::vector<at::Tensor>& recons, int64_t H, int64_t W) {
  using acc_t = acc_type<scalar_t>;
  std::vector<Level<scalar_t>> levels;
  for (size_t l = 0; l < feats.size(); ++l) {
    Level<scalar_t> L;
    L.feat = feats[l].data_ptr<scalar_t>();
    L.recon = recons[l].data_ptr<scalar_t>();
    L.channels = feats[l].size(1);
    L.h = feats[l].size(2);
    L.w = feats[l].size(3);
    L.identity = L.h == H && L.w == W;
    const acc_t scale_h = align_corners_scale<acc_t>(L.h, H), scale_w = align_corners_scale<acc_t>(L.w, W);
    for (int64_t y = 0; y < H; ++y) L.rows.push_back(source_tap<acc_t>(y, L.h, scale_h));
    for (int64_t x = 0; x < W; ++x) L.cols.push_back(source_tap<acc_t>(x, L.w, scale_w));
    adjoint_taps<acc_t>(L.h, H, scale_h, L.row_windows, L.row_weights);
    adjoint_taps<acc_t>(L.w, W, scale_w, L.col_windows, L.col_weights);
    levels.push_back(std::move(L));
  }
  return levels;
}

// Concatenated channel -> (level, channel within the level).
inline std::pair<int, int64_t> locate(const std::vector<int64_t>& offset, int64_t channel) {
  int l = 0;
  while (channel >= offset[l + 1]) ++l;
  return {l, channel - offset[l]};
}

// residual[p] = (feat - recon)^2 of plane (b, c) of a level.
template <typename scalar_t, typename acc_t>
void residual_plane(const Level<scalar_t>& L, int64_t b, int64_t c, acc_t* residual) {
  const int64_t n = L.h * L.w, base = (b * L.channels + c) * n;
  const scalar_t* f = L.feat + base;
  const scalar_t* r = L.recon + base;
  for (int64_t p = 0; p < n; ++p) {
    const acc_t d = static_cast<acc_t>(f[p]) - static_cast<acc_t>(r[p]);
    residual[p] = d * d;
  }
}

// Upsample one residual plane (h, w) to out (H, W): first along x for every source row
// (tmp, h x W), then along y. Same arithmetic as upsample_bilinear2d:
// out = l0y * (l0x v00 + l1x v01) + l1y * (l0x v10 + l1x v11).
template <typename scalar_t, typename acc_t, typename out_t>
void upsample_plane(const Level<scalar_t>& L, const acc_t* residual, int64_t H, int64_t W, acc_t* tmp,
                    out_t* out) {
  if (L.identity) {
    for (int64_t p = 0; p < H * W; ++p) out[p] = static_cast<out_t>(residual[p]);
    return;
  }
  for (int64_t i = 0; i < L.h; ++i) {
    const acc_t* src = residual + i * L.w;
    acc_t* dst = tmp + i * W;
    for (int64_t x = 0; x < W; ++x) {
      const auto& t = L.cols[x];
      dst[x] = t.l0 * src[t.i0] + t.l1 * src[t.i1];
    }
  }
  for (int64_t y = 0; y < H; ++y) {
    const auto& t = L.rows[y];
    const acc_t* r0 = tmp + t.i0 * W;
    const acc_t* r1 = tmp + t.i1 * W;
    out_t* dst = out + y * W;
    for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<out_t>(t.l0 * r0[x] + t.l1 * r1[x]);
  }
}

std::vector<at::Tensor> contiguous_all(at::TensorList list) {
  std::vector<at::Tensor> out;
  for (const auto& t : list) out.push_back(t.contiguous());
  return out;
}

// ---------------------------------------------------------------------------------------
// rrs_stats
// ---------------------------------------------------------------------------------------
at::Tensor rrs_stats_cpu(at::TensorList feats_in, at::TensorList recons_in) {
  const auto info = check_levels("rrs_stats", feats_in, recons_in);
  const auto feats = contiguous_all(feats_in), recons = contiguous_all(recons_in);
  const int64_t B = info.batch, M = info.channels, H = info.height, W = info.width, HW = H * W;
  auto stats = at::empty({3, B, M}, feats[0].options().dtype(at::kDouble));
  double* out = stats.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(feats[0].scalar_type(), "rrs_stats_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto levels = make_levels<scalar_t>(feats, recons, H, W);
    at::parallel_for(0, B * M, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> residual, tmp, up(HW);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / M, channel = task % M;
        const auto [l, c] = locate(info.channel_offset, channel);
        const auto& L = levels[l];
        residual.resize(L.h * L.w);
        tmp.resize(L.h * W);
        residual_plane(L, b, c, residual.data());
        upsample_plane(L, residual.data(), H, W, tmp.data(), up.data());
        // Row partial sums in acc_t, the total in double: accurate and still vectorisable.
        acc_t peak = -std::numeric_limits<acc_t>::infinity();
        double sum = 0.0;
        for (int64_t y = 0; y < H; ++y) {
          const acc_t* row = up.data() + y * W;
          acc_t row_sum = 0;
          RN_PRAGMA(omp simd reduction(max : peak) reduction(+ : row_sum))
          for (int64_t x = 0; x < W; ++x) {
            peak = row[x] > peak ? row[x] : peak;
            row_sum += row[x];
          }
          sum += row_sum;
        }
        const double mean = sum / HW;
        double m2 = 0.0;  // second pass over the cached plane: a stable variance
        for (int64_t y = 0; y < H; ++y) {
          const acc_t* row = up.data() + y * W;
          acc_t row_m2 = 0;
          RN_PRAGMA(omp simd reduction(+ : row_m2))
          for (int64_t x = 0; x < W; ++x) {
            const acc_t d = row[x] - static_cast<acc_t>(mean);
            row_m2 += d * d;
          }
          m2 += row_m2;
        }
        out[b * M + channel] = std::isnan(sum) ? sum : static_cast<double>(peak);  // amax propagates NaN
        out[B * M + b * M + channel] = mean;
        out[2 * B * M + b * M + channel] = m2 / HW;
      }
    });
  });
  return stats;
}

// ---------------------------------------------------------------------------------------
// rrs_rank
// ---------------------------------------------------------------------------------------
// Descending by score, NaN first (as torch.sort), ties to the lower channel index.
struct Better {
  const double* score;
  bool operator()(int64_t a, int64_t b) const {
    const double sa = score[a], sb = score[b];
    const bool na = std::isnan(sa), nb = std::isnan(sb);
    if (na != nb) return na;
    if (!na && sa != sb) return sa > sb;
    return a < b;
  }
};

at::Tensor rrs_rank_cpu(const at::Tensor& stats_in, int64_t spatial, int64_t k_max, int64_t k_mean,
                        at::Tensor& running_mean, at::Tensor& running_var, bool training, double momentum,
                        double eps) {
  check_rank_args(stats_in, spatial, k_max, k_mean, running_mean, running_var, training);
  const auto stats = stats_in.contiguous();
  const int64_t B = stats.size(1), M = stats.size(2), K = k_max + k_mean;
  const double* peak = stats.data_ptr<double>();
  const double* mean = peak + B * M;
  const double* var = mean + B * M;
  std::vector<double> channel_mean(M), channel_invstd(M);
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "rrs_rank_cpu", [&] {
    scalar_t* run_mean = running_mean.data_ptr<scalar_t>();
    scalar_t* run_var = running_var.data_ptr<scalar_t>();
    const double count = static_cast<double>(B) * spatial;
    for (int64_t c = 0; c < M; ++c) {
      double mu, sigma2;
      if (training) {  // batch statistics over B*H*W, merged from the per-sample ones
        mu = 0.0;
        for (int64_t b = 0; b < B; ++b) mu += mean[b * M + c];
        mu /= B;
        sigma2 = 0.0;
        for (int64_t b = 0; b < B; ++b) {
          const double d = mean[b * M + c] - mu;
          sigma2 += var[b * M + c] + d * d;
        }
        sigma2 /= B;
        // F.batch_norm's update: the unbiased variance goes into the running estimate
        run_mean[c] = static_cast<scalar_t>(momentum * mu + (1.0 - momentum) * run_mean[c]);
        run_var[c] = static_cast<scalar_t>(momentum * sigma2 * count / (count - 1.0) + (1.0 - momentum) * run_var[c]);
      } else {
        mu = static_cast<double>(run_mean[c]);
        sigma2 = static_cast<double>(run_var[c]);
      }
      channel_mean[c] = mu;
      channel_invstd[c] = 1.0 / std::sqrt(sigma2 + eps);
    }
  });
  auto indices = at::empty({B, K}, stats.options().dtype(at::kLong));
  int64_t* out = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> score(M);
    std::vector<int64_t> order(M);
    for (int64_t b = begin; b < end; ++b) {
      // BatchNorm is increasing per channel: normalise the (B, M) statistics, not the maps.
      const std::pair<const double*, int64_t> modes[2] = {{peak + b * M, k_max}, {mean + b * M, k_mean}};
      int64_t offset = 0;
      for (const auto& [stat, k] : modes) {
        for (int64_t c = 0; c < M; ++c) score[c] = (stat[c] - channel_mean[c]) * channel_invstd[c];
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(), Better{score.data()});
        std::copy(order.begin(), order.begin() + k, out + b * K + offset);
        offset += k;
      }
    }
  });
  return indices;
}

// ---------------------------------------------------------------------------------------
// rrs_gather and its backward
// ---------------------------------------------------------------------------------------
void check_index_range(const at::Tensor& indices, int64_t M) {
  if (indices.numel() == 0) return;
  const int64_t low = indices.min().item<int64_t>(), high = indices.max().item<int64_t>();
  TORCH_CHECK(low >= 0 && high < M, "rrs_gather: indices must lie in [0, ", M, "), got values in [", low,
              ", ", high, "]");
}

at::Tensor rrs_gather_cpu(at::TensorList feats_in, at::TensorList recons_in, const at::Tensor& indices_in) {
  const auto info = check_levels("rrs_gather", feats_in, recons_in);
  check_indices("rrs_gather", indices_in, info, feats_in[0]);
  const auto feats = contiguous_all(feats_in), recons = contiguous_all(recons_in);
  const auto indices = indices_in.contiguous();
  check_index_range(indices, info.channels);
  const int64_t B = info.batch, K = indices.size(1), H = info.height, W = info.width;
  auto selected = at::empty({B, K, H, W}, feats[0].options());
  const int64_t* idx = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(feats[0].scalar_type(), "rrs_gather_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto levels = make_levels<scalar_t>(feats, recons, H, W);
    scalar_t* out = selected.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> residual, tmp;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / K;
        const auto [l, c] = locate(info.channel_offset, idx[task]);
        const auto& L = levels[l];
        residual.resize(L.h * L.w);
        tmp.resize(L.h * W);
        residual_plane(L, b, c, residual.data());
        upsample_plane(L, residual.data(), H, W, tmp.data(), out + task * H * W);
      }
    });
  });
  return selected;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> rrs_gather_backward_cpu(
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
  const auto feats = contiguous_all(feats_in), recons = contiguous_all(recons_in);
  const auto indices = indices_in.contiguous();
  const auto grad = grad_in.contiguous();
  check_index_range(indices, M);

  // Which output planes j read channel m of sample b (duplicated picks: several j).
  const int64_t* idx = indices.data_ptr<int64_t>();
  std::vector<int64_t> start(B * M + 1, 0), picks(B * K);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < K; ++j) ++start[b * M + idx[b * K + j] + 1];
  std::partial_sum(start.begin(), start.end(), start.begin());
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < K; ++j) picks[fill[b * M + idx[b * K + j]]++] = j;
  }

  std::vector<at::Tensor> grad_feats, grad_recons;
  for (size_t l = 0; l < feats.size(); ++l) {
    if (need_feats) grad_feats.push_back(at::empty_like(feats[l]));
    if (need_recons) grad_recons.push_back(at::empty_like(recons[l]));
  }
  AT_DISPATCH_FLOATING_TYPES(feats[0].scalar_type(), "rrs_gather_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto levels = make_levels<scalar_t>(feats, recons, H, W);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    // Every element of every gradient is written exactly once (zeros where unselected).
    at::parallel_for(0, B * M, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gsum(H * W), tmp, gres;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / M;
        const auto [l, c] = locate(info.channel_offset, task % M);
        const auto& L = levels[l];
        const int64_t n = L.h * L.w, base = (b * L.channels + c) * n;
        scalar_t* gf = need_feats ? grad_feats[l].template data_ptr<scalar_t>() + base : nullptr;
        scalar_t* gr = need_recons ? grad_recons[l].template data_ptr<scalar_t>() + base : nullptr;
        if (start[task] == start[task + 1]) {
          if (gf) std::fill(gf, gf + n, scalar_t(0));
          if (gr) std::fill(gr, gr + n, scalar_t(0));
          continue;
        }
        // sum of the output-plane gradients that came from this channel
        std::fill(gsum.begin(), gsum.end(), acc_t(0));
        for (int64_t p = start[task]; p < start[task + 1]; ++p) {
          const scalar_t* src = g + (b * K + picks[p]) * H * W;
          for (int64_t q = 0; q < H * W; ++q) gsum[q] += static_cast<acc_t>(src[q]);
        }
        // adjoint of the upsampling, as a separable gather (the same windows and weights
        // as the CUDA kernel): along x into (H, w), then along y into (h, w)
        const acc_t* dres = gsum.data();
        if (!L.identity) {
          tmp.resize(H * L.w);
          for (int64_t y = 0; y < H; ++y) {
            const acc_t* src = gsum.data() + y * W;
            acc_t* dst = tmp.data() + y * L.w;
            for (int64_t j = 0; j < L.w; ++j) {
              const Window& win = L.col_windows[j];
              const acc_t* wt = L.col_weights[j].data();
              acc_t sum = 0;
              for (int64_t x = win.first; x <= win.last; ++x) sum += wt[x - win.first] * src[x];
              dst[j] = sum;
            }
          }
          gres.assign(n, acc_t(0));
          for (int64_t i = 0; i < L.h; ++i) {
            const Window& win = L.row_windows[i];
            acc_t* dst = gres.data() + i * L.w;
            for (int64_t y = win.first; y <= win.last; ++y) {
              const acc_t wy = L.row_weights[i][y - win.first];
              const acc_t* src = tmp.data() + y * L.w;
              for (int64_t j = 0; j < L.w; ++j) dst[j] += wy * src[j];
            }
          }
          dres = gres.data();
        }
        // through the square: d(f - r)^2 = 2 (f - r) (df - dr)
        const scalar_t* f = L.feat + base;
        const scalar_t* r = L.recon + base;
        for (int64_t p = 0; p < n; ++p) {
          const acc_t v = acc_t(2) * (static_cast<acc_t>(f[p]) - static_cast<acc_t>(r[p])) * dres[p];
          if (gf) gf[p] = static_cast<scalar_t>(v);
          if (gr) gr[p] = static_cast<scalar_t>(-v);
        }
      }
    });
  });
  return {grad_feats, grad_recons};
}

// ---------------------------------------------------------------------------------------
// afs_channel_loss
// ---------------------------------------------------------------------------------------
at::Tensor afs_channel_loss_cpu(const at::Tensor& anomalous_in, const at::Tensor& normal_in,
                                const at::Tensor& mask_in) {
  check_afs(anomalous_in, normal_in, mask_in);
  const auto anomalous = anomalous_in.contiguous(), normal = normal_in.contiguous();
  const auto mask = mask_in.to(at::kFloat).contiguous();
  const int64_t B = anomalous.size(0), C = anomalous.size(1), h = anomalous.size(2), w = anomalous.size(3);
  const int64_t MH = mask.size(2), MW = mask.size(3), hw = h * w, n = B * hw;
  // the mask, nearest-resized to the feature map once for all channels
  std::vector<float> label(n);
  const float* m = mask.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x)
        label[b * hw + y * w + x] =
            m[(b * MH + nearest_source(y, MH, h)) * MW + nearest_source(x, MW, w)];
  auto loss = at::empty({C}, anomalous.options().dtype(at::kFloat));
  float* out = loss.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES(anomalous.scalar_type(), "afs_channel_loss_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* a = anomalous.data_ptr<scalar_t>();
    const scalar_t* z = normal.data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> d(n);  // the channel's squared differences, kept for the second pass
      for (int64_t c = begin; c < end; ++c) {
        acc_t low = std::numeric_limits<acc_t>::infinity(), high = -low;
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* pa = a + (b * C + c) * hw;
          const scalar_t* pz = z + (b * C + c) * hw;
          acc_t* pd = d.data() + b * hw;
          RN_PRAGMA(omp simd reduction(min : low) reduction(max : high))
          for (int64_t p = 0; p < hw; ++p) {
            const acc_t diff = static_cast<acc_t>(pa[p]) - static_cast<acc_t>(pz[p]);
            pd[p] = diff * diff;
            low = pd[p] < low ? pd[p] : low;
            high = pd[p] > high ? pd[p] : high;
          }
        }
        const acc_t range = high - low + static_cast<acc_t>(kAfsEps);
        double total = 0.0;
        for (int64_t b = 0; b < B; ++b) {
          const acc_t* pd = d.data() + b * hw;
          const float* pl = label.data() + b * hw;
          acc_t partial = 0;
          RN_PRAGMA(omp simd reduction(+ : partial))
          for (int64_t p = 0; p < hw; ++p) {
            const acc_t e = (pd[p] - low) / range - static_cast<acc_t>(pl[p]);
            partial += e * e;
          }
          total += partial;
        }
        out[c] = static_cast<float>(total / n);
      }
    });
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(realnet, CPU, m) {
  m.impl("rrs_stats", &rrs_stats_cpu);
  m.impl("rrs_rank", &rrs_rank_cpu);
  m.impl("rrs_gather", &rrs_gather_cpu);
  m.impl("rrs_gather_backward", &rrs_gather_backward_cpu);
  m.impl("afs_channel_loss", &afs_channel_loss_cpu);
}

}  // namespace realnet
